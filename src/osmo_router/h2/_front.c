/* The native data path of HTTP/2 connections (issue 18): h2/front.py says why and how.
 *
 * A Front is a connection's get_buffer / buffer_updated (asyncio.BufferedProtocol). While the Python
 * frame reader (h2/reader.py) is between frames it hands the transport the process's front buffer; a
 * read that is exactly one whole DATA frame without flags, on a stream with a lane, is passed on here
 * before any Python runs: a Lane's (an edge's) data frame payload to its DirectSender's socket, a
 * RelayLane's (the router's) message to the paired stream. A SocketLane is a forwarded socket's
 * readiness callback: a small read goes onto the session's stream. The bookkeeping Python would have
 * done before the write is done after it, by the lane's `after`. Anything else is copied into the
 * reader, as Connection.data_received does, and takes the Python path.
 *
 * The checks read the same attributes the Python path tests, named here beside the Python that tests
 * them; a missing attribute or an unexpected type declines (the Python path then decides).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>

/* The front's own read buffer: a small message's frame, and then some (h2/reader.py HEADER_READ). */
#define FRONT_BUF (16 * 1024)
/* A read that fills it means a busy connection: the next reads go to the reader's larger buffers until
 * this many small ones came in a row (h2/reader.py SMALL_READ, QUIET_AFTER). */
#define SMALL_READ (4 * 1024)
#define QUIET_AFTER 32

static PyObject *s_start, *s_end, *s_left, *s_preface, *s_discarding, *s_closed, *s_recv_unacked,
    *s_connection_window, *s_reset_code, *s_ended_in, *s_recv_left, *s_messages, *s_need, *s_head, *s_listener,
    *s_generation, *s_ended, *s_resumable, *s_data_sink, *s_data_lane, *s_handler_waiting, *s_incoming, *s_lost,
    *s_enabled, *s_rest, *s_sock, *s_fileno, *s_send_later;

static PyObject *s_waiter, *s_done, *s_direct, *s_hung_up, *s_error, *s_handed, *s_sending, *s_write_lock,
    *s_locked, *s_inner, *s_room_by_buffer, *s_try_write, *s_task, *s_pending, *s_barriers, *s_direct_held,
    *s_stream, *s_status, *s_half_closed, *s_closed_out, *s_end_pending, *s_headers_sent, *s_out_bytes,
    *s_write_paused, *s_transport, *s_is_closing, *s_send_window, *s_peer_max_frame, *s_entries, *s_bytes,
    *s_limit, *s_shared, *s_used, *s_total, *s_deferred, *s_write, *s_id, *s_passthrough, *s_idle, *s_sink,
    *s_framed, *s_items, *s_getter, *s_budgets, *s_held;

/* ---- Lane ------------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *conn;      /* h2 Connection */
    PyObject *stream;    /* h2 Stream */
    PyObject *listener;  /* the stream's listener while the lane holds (Stream._listener) */
    PyObject *session;   /* ResumableStream */
    PyObject *generation;
    PyObject *sender;    /* io/socket_pumps.DirectSender */
    PyObject *after;     /* after(flow, size): the bookkeeping */
    Py_ssize_t max_message;
} Lane;

static int Lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"conn", "stream", "listener", "session", "generation", "sender", "after", "max_message",
                            NULL};
    PyObject *conn, *stream, *listener, *session, *generation, *sender, *after;
    Py_ssize_t max_message;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOn", names, &conn, &stream, &listener, &session,
                                     &generation, &sender, &after, &max_message))
        return -1;
    Py_XSETREF(self->conn, Py_NewRef(conn));
    Py_XSETREF(self->stream, Py_NewRef(stream));
    Py_XSETREF(self->listener, Py_NewRef(listener));
    Py_XSETREF(self->session, Py_NewRef(session));
    Py_XSETREF(self->generation, Py_NewRef(generation));
    Py_XSETREF(self->sender, Py_NewRef(sender));
    Py_XSETREF(self->after, Py_NewRef(after));
    self->max_message = max_message;
    return 0;
}

static int Lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->conn);
    Py_VISIT(self->stream);
    Py_VISIT(self->listener);
    Py_VISIT(self->session);
    Py_VISIT(self->generation);
    Py_VISIT(self->sender);
    Py_VISIT(self->after);
    return 0;
}

static int Lane_clear(Lane *self) {
    Py_CLEAR(self->conn);
    Py_CLEAR(self->stream);
    Py_CLEAR(self->listener);
    Py_CLEAR(self->session);
    Py_CLEAR(self->generation);
    Py_CLEAR(self->sender);
    Py_CLEAR(self->after);
    return 0;
}

static void Lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    Lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "osmo_router.h2._front.Lane",
    .tp_doc = "Where a stream's data messages go from C: a DirectSender's socket (h2/front.py open_lane).",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_dealloc = (destructor)Lane_dealloc,
};

/* ---- attribute tests: 1 true, 0 false, -1 unknown (the error cleared: the caller declines) -------- */

static int truth(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        PyErr_Clear();
        return -1;
    }
    int result = PyObject_IsTrue(value);
    Py_DECREF(value);
    if (result < 0) PyErr_Clear();
    return result;
}

static int is_none(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        PyErr_Clear();
        return -1;
    }
    int result = value == Py_None;
    Py_DECREF(value);
    return result;
}

static int same(PyObject *obj, PyObject *name, PyObject *expected) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        PyErr_Clear();
        return 0;
    }
    int result = value == expected;
    Py_DECREF(value);
    return result;
}

/* The attribute as a C integer; 0 on success, -1 (error cleared) if it is none. */
static int integer(PyObject *obj, PyObject *name, long long *out) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        PyErr_Clear();
        return -1;
    }
    *out = PyLong_Check(value) ? PyLong_AsLongLong(value) : -1;
    int bad = !PyLong_Check(value) || (*out == -1 && PyErr_Occurred());
    Py_DECREF(value);
    if (bad) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

/* ---- Front ----------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *conn;
    PyObject *reader;
    PyObject *reader_get_buffer;
    PyObject *reader_buffer_updated;
    PyObject *lanes; /* dict: stream id -> Lane */
    PyObject *view;  /* a memoryview of buf, handed out as is */
    int delegated;   /* the last buffer handed out was the reader's */
    int idle;        /* the reader is between frames with nothing held */
    int busy_reads;  /* reads left to the reader's buffers (a busy connection) */
    unsigned long long passed;
    char *buf; /* the process's one read buffer (see shared_buf) */
} Front;

/* One read buffer for every front of the process: a transport calls get_buffer, reads into it and calls
 * buffer_updated at once (uvloop, its TLS layer and asyncio alike), and buffer_updated leaves nothing in
 * it (a frame passed on, or copied into the reader). `shared_owner` guards the rule: a front that finds
 * the buffer handed to another and not given back reads through its reader instead. */
static char shared_buf[FRONT_BUF];
static PyObject *shared_view;
static void *shared_owner;

static int Front_init(Front *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"conn", "reader", NULL};
    PyObject *conn, *reader;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", names, &conn, &reader)) return -1;
    Py_XSETREF(self->conn, Py_NewRef(conn));
    Py_XSETREF(self->reader, Py_NewRef(reader));
    Py_XSETREF(self->reader_get_buffer, PyObject_GetAttrString(reader, "get_buffer"));
    Py_XSETREF(self->reader_buffer_updated, PyObject_GetAttrString(reader, "buffer_updated"));
    Py_XSETREF(self->lanes, PyDict_New());
    Py_XSETREF(self->view, Py_NewRef(shared_view));
    self->buf = shared_buf;
    if (!self->reader_get_buffer || !self->reader_buffer_updated || !self->lanes || !self->view) return -1;
    self->delegated = 0;
    self->idle = 0; /* SETTINGS and the rest of the opening go to the reader */
    self->busy_reads = 0;
    return 0;
}

static int Front_traverse(Front *self, visitproc visit, void *arg) {
    Py_VISIT(self->conn);
    Py_VISIT(self->reader);
    Py_VISIT(self->reader_get_buffer);
    Py_VISIT(self->reader_buffer_updated);
    Py_VISIT(self->lanes);
    Py_VISIT(self->view);
    return 0;
}

static int Front_clear(Front *self) {
    Py_CLEAR(self->conn);
    Py_CLEAR(self->reader);
    Py_CLEAR(self->reader_get_buffer);
    Py_CLEAR(self->reader_buffer_updated);
    Py_CLEAR(self->lanes);
    Py_CLEAR(self->view);
    return 0;
}

static void Front_dealloc(Front *self) {
    PyObject_GC_UnTrack(self);
    if (shared_owner == self) shared_owner = NULL;
    Front_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether the reader is between frames with nothing held (FrameReader: _start == _end, no DATA payload
 * left, the preface taken, not discarding). */
static int reader_idle(Front *self) {
    long long start, end;
    if (integer(self->reader, s_start, &start) < 0 || integer(self->reader, s_end, &end) < 0) return 0;
    return start == end && truth(self->reader, s_left) == 0 && truth(self->reader, s_preface) == 0 &&
           truth(self->reader, s_discarding) == 0;
}

/* Copy `count` bytes of our buffer into the reader, as Connection.data_received does. */
static int feed(Front *self, Py_ssize_t count) {
    Py_ssize_t done = 0;
    while (done < count) {
        if (truth(self->conn, s_closed) != 0) break;
        PyObject *hint = PyLong_FromSsize_t(count - done);
        if (hint == NULL) return -1;
        PyObject *target = PyObject_CallOneArg(self->reader_get_buffer, hint);
        Py_DECREF(hint);
        if (target == NULL) return -1;
        Py_buffer into;
        if (PyObject_GetBuffer(target, &into, PyBUF_WRITABLE) < 0) {
            Py_DECREF(target);
            return -1;
        }
        Py_ssize_t take = into.len < count - done ? into.len : count - done;
        memcpy(into.buf, self->buf + done, take);
        PyBuffer_Release(&into);
        Py_DECREF(target);
        if (take <= 0) break;
        done += take;
        PyObject *taken = PyLong_FromSsize_t(take);
        if (taken == NULL) return -1;
        PyObject *result = PyObject_CallOneArg(self->reader_buffer_updated, taken);
        Py_DECREF(taken);
        if (result == NULL) return -1;
        Py_DECREF(result);
    }
    return 0;
}

static int varint(const unsigned char *p, Py_ssize_t end, Py_ssize_t *pos, unsigned long long *value) {
    unsigned long long v = 0;
    for (int shift = 0; shift < 64 && *pos < end; shift += 7) {
        unsigned char c = p[(*pos)++];
        v |= (unsigned long long)(c & 0x7F) << shift;
        if (c < 0x80) {
            *value = v;
            return 1;
        }
    }
    return 0;
}

/* Where the data frame's payload lies in a DATA payload of `flow` bytes: one whole uncompressed gRPC
 * message (Stream.received_data's test) that is exactly Frame(data=...) in field 2 (wire/codec.py
 * payload_offset). 0 and *start, *size set; -1 otherwise. */
static int data_payload(const unsigned char *p, Py_ssize_t flow, Py_ssize_t max_message, Py_ssize_t *start,
                        Py_ssize_t *size) {
    if (flow < 8 || p[0] != 0) return -1;
    Py_ssize_t length = (Py_ssize_t)p[1] << 24 | (Py_ssize_t)p[2] << 16 | (Py_ssize_t)p[3] << 8 | p[4];
    if (length != flow - 5 || length > max_message || p[5] != 0x12) return -1;
    Py_ssize_t pos = 6;
    unsigned long long frame, data;
    if (!varint(p, flow, &pos, &frame) || frame != (unsigned long long)(flow - pos)) return -1;
    if (pos >= flow || p[pos++] != 0x0A) return -1;
    if (!varint(p, flow, &pos, &data) || data != (unsigned long long)(flow - pos)) return -1;
    *start = pos;
    *size = (Py_ssize_t)data;
    return 0;
}

/* Whether the Python path would hand this message straight to the lane's DirectSender. */
static int lane_open(Lane *lane, Py_ssize_t flow) {
    long long value;
    /* Connection.data_frame: the peer keeps within the connection window. */
    long long unacked, window;
    if (integer(lane->conn, s_recv_unacked, &unacked) < 0 || integer(lane->conn, s_connection_window, &window) < 0 ||
        unacked + flow > window)
        return 0;
    /* Stream.received_data: the stream open, within its window, nothing queued or under way before this
     * message, and the listener the lane was opened for (Call._stream_listener: none while a message
     * waits for `read` or the call has its status). */
    PyObject *s = lane->stream;
    if (is_none(s, s_reset_code) != 1 || truth(s, s_ended_in) != 0 || truth(s, s_messages) != 0 ||
        truth(s, s_need) != 0 || truth(s, s_head) != 0)
        return 0;
    if (integer(s, s_recv_left, &value) < 0 || value < flow) return 0;
    PyObject *listener = PyObject_GetAttr(s, s_listener);
    if (listener == NULL) {
        PyErr_Clear();
        return 0;
    }
    int same = listener == lane->listener;
    Py_DECREF(listener);
    if (!same) return 0;
    /* ResumableStream._pushed_data: this generation, not ended, resuming (a peer that does not resume
     * has a hold-back test of its own: the Python path), and its data sink taking it: a data lane, the
     * handler waiting with nothing queued, not lost; and that sink is the lane's sender's. */
    PyObject *r = lane->session;
    PyObject *generation = PyObject_GetAttr(r, s_generation);
    if (generation == NULL) {
        PyErr_Clear();
        return 0;
    }
    int current = PyObject_RichCompareBool(generation, lane->generation, Py_EQ);
    Py_DECREF(generation);
    if (current != 1) {
        PyErr_Clear();
        return 0;
    }
    if (truth(r, s_ended) != 0 || truth(r, s_resumable) != 1 || truth(r, s_data_lane) != 1 ||
        truth(r, s_handler_waiting) != 1 || truth(r, s_incoming) != 0 || is_none(r, s_lost) != 1)
        return 0;
    PyObject *sink = PyObject_GetAttr(r, s_data_sink);
    if (sink == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ours = PyMethod_Check(sink) && PyMethod_GET_SELF(sink) == lane->sender;
    Py_DECREF(sink);
    if (!ours) return 0;
    /* DirectSender.offer_data: enabled, no rest of an earlier send still going. */
    return truth(lane->sender, s_enabled) == 1 && is_none(lane->sender, s_rest) == 1;
}

/* The sender's socket descriptor, or -1. */
static int sender_fd(Lane *lane) {
    PyObject *sock = PyObject_GetAttr(lane->sender, s_sock);
    if (sock == NULL) {
        PyErr_Clear();
        return -1;
    }
    PyObject *fd = PyObject_CallMethodNoArgs(sock, s_fileno);
    Py_DECREF(sock);
    if (fd == NULL) {
        PyErr_Clear();
        return -1;
    }
    long value = PyLong_Check(fd) ? PyLong_AsLong(fd) : -1;
    Py_DECREF(fd);
    if (value == -1) PyErr_Clear();
    return (int)value;
}

/* ---- RelayLane: the router's relay hop ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *conn;     /* the receiving h2 Connection */
    PyObject *stream;   /* its stream, whose passthrough is `through` */
    PyObject *through;  /* relay._Passing.through, the stream's passthrough while the lane holds */
    PyObject *passing;  /* relay._Passing */
    PyObject *queue;    /* its core/flow_control.FlowQueue */
    PyObject *sink;     /* the queue's sink (relay._DirectWrite), whose `framed` is `framed` */
    PyObject *framed;   /* the other side's Stream.try_write_framed */
    PyObject *out;      /* that Stream */
    PyObject *out_conn; /* and its Connection */
    PyObject *after;    /* after(flow, size): the bookkeeping */
    Py_ssize_t max_message;
} RelayLane;

#define RELAY_LANE_FIELDS(DO) \
    DO(conn) DO(stream) DO(through) DO(passing) DO(queue) DO(sink) DO(framed) DO(out) DO(out_conn) DO(after)

static int RelayLane_init(RelayLane *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"conn", "stream", "through", "passing", "queue", "sink", "framed", "out", "out_conn",
                            "after", "max_message", NULL};
    PyObject *o[10];
    Py_ssize_t max_message;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOOn", names, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                                     &o[6], &o[7], &o[8], &o[9], &max_message))
        return -1;
    PyObject **slots[10] = {&self->conn, &self->stream, &self->through, &self->passing, &self->queue,
                            &self->sink, &self->framed, &self->out,     &self->out_conn, &self->after};
    for (int i = 0; i < 10; i++) Py_XSETREF(*slots[i], Py_NewRef(o[i]));
    self->max_message = max_message;
    return 0;
}

static int RelayLane_traverse(RelayLane *self, visitproc visit, void *arg) {
#define RVISIT(f) Py_VISIT(self->f);
    RELAY_LANE_FIELDS(RVISIT)
    return 0;
}

static int RelayLane_clear(RelayLane *self) {
#define RCLEAR(f) Py_CLEAR(self->f);
    RELAY_LANE_FIELDS(RCLEAR)
    return 0;
}

static void RelayLane_dealloc(RelayLane *self) {
    PyObject_GC_UnTrack(self);
    RelayLane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RelayLaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "osmo_router.h2._front.RelayLane",
    .tp_doc = "Where a relayed stream's messages go from C: the paired stream (h2/front.py open_relay_lane).",
    .tp_basicsize = sizeof(RelayLane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RelayLane_init,
    .tp_traverse = (traverseproc)RelayLane_traverse,
    .tp_clear = (inquiry)RelayLane_clear,
    .tp_dealloc = (destructor)RelayLane_dealloc,
};

/* Write `frame` on `conn`'s transport after the window updates it owes the peer (Connection.send_now's
 * write: `_deferred` first, in the same write). 0, or -1 with a Python error set. */
static int write_after_deferred(PyObject *conn, PyObject *frame) {
    PyObject *deferred = PyObject_GetAttr(conn, s_deferred);
    if (deferred == NULL) return -1;
    PyObject *transport = PyObject_GetAttr(conn, s_transport);
    if (transport == NULL) {
        Py_DECREF(deferred);
        return -1;
    }
    PyObject *out = Py_NewRef(frame);
    int ok = 1;
    if (PyBytes_Check(deferred) && PyBytes_GET_SIZE(deferred)) {
        PyObject *joined = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(deferred) + PyBytes_GET_SIZE(frame));
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        ok = joined != NULL && empty != NULL;
        if (ok) {
            memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(deferred), PyBytes_GET_SIZE(deferred));
            memcpy(PyBytes_AS_STRING(joined) + PyBytes_GET_SIZE(deferred), PyBytes_AS_STRING(frame),
                   PyBytes_GET_SIZE(frame));
            ok = PyObject_SetAttr(conn, s_deferred, empty) == 0;
            Py_SETREF(out, Py_NewRef(joined));
        }
        Py_XDECREF(joined);
        Py_XDECREF(empty);
    }
    PyObject *written = ok ? PyObject_CallMethodOneArg(transport, s_write, out) : NULL;
    Py_DECREF(out);
    Py_DECREF(transport);
    Py_DECREF(deferred);
    if (written == NULL) return -1;
    Py_DECREF(written);
    return 0;
}

/* Whether an h2 Stream may be written to now with a message of `length` bytes (prefix included), as
 * Stream.try_write_framed and Connection.send_now test it. */
static int writable(PyObject *stream, PyObject *conn, Py_ssize_t length) {
    long long value;
    if (truth(stream, s_closed_out) != 0 || truth(stream, s_end_pending) != 0 || is_none(stream, s_reset_code) != 1 ||
        truth(stream, s_headers_sent) != 1 || truth(stream, s_out_bytes) != 0 || truth(conn, s_write_paused) != 0)
        return 0;
    if (integer(stream, s_send_window, &value) < 0 || value < length) return 0;
    if (integer(conn, s_send_window, &value) < 0 || value < length) return 0;
    if (integer(conn, s_peer_max_frame, &value) < 0 || value < length) return 0;
    PyObject *transport = PyObject_GetAttr(conn, s_transport);
    if (transport == NULL || transport == Py_None) {
        Py_XDECREF(transport);
        PyErr_Clear();
        return 0;
    }
    PyObject *closing = PyObject_CallMethodNoArgs(transport, s_is_closing);
    Py_DECREF(transport);
    int open = closing == Py_False;
    Py_XDECREF(closing);
    PyErr_Clear();
    return open;
}

/* Whether the Python path would pass this DATA payload (`flow` bytes at `p`) on as it is. */
static int relay_open(RelayLane *lane, const unsigned char *p, Py_ssize_t flow) {
    long long value, unacked, window;
    /* Connection.data_frame: within the connection window. */
    if (integer(lane->conn, s_recv_unacked, &unacked) < 0 || integer(lane->conn, s_connection_window, &window) < 0 ||
        unacked + flow > window)
        return 0;
    /* Stream.pass_through: one whole uncompressed message, nothing before it, within the window; the
     * passthrough the lane was opened for. */
    Py_ssize_t size = flow - 5;
    if (flow < 6 || p[0] != 0 || ((Py_ssize_t)p[1] << 24 | (Py_ssize_t)p[2] << 16 | (Py_ssize_t)p[3] << 8 | p[4]) != size ||
        size > lane->max_message)
        return 0;
    PyObject *s = lane->stream;
    if (is_none(s, s_reset_code) != 1 || truth(s, s_ended_in) != 0 || truth(s, s_messages) != 0 ||
        truth(s, s_need) != 0 || truth(s, s_head) != 0 || !same(s, s_passthrough, lane->through))
        return 0;
    if (integer(s, s_recv_left, &value) < 0 || value < flow) return 0;
    /* relay._Passing.through: the reader waits; a frame message; no control frame (an exit status, a
     * half-close or a detach is short and has no data first: the reader looks at those). */
    if (truth(lane->passing, s_idle) != 1 || p[5] != 0x12) return 0;
    if (size <= 32 && (size < 3 || p[7] != 0x0A)) return 0;
    /* FlowQueue.pass_through: its sink the lane's, the consumer waiting with nothing queued, every
     * budget with room. */
    PyObject *q = lane->queue;
    if (!same(q, s_sink, lane->sink) || !same(lane->sink, s_framed, lane->framed) || truth(q, s_items) != 0 ||
        is_none(q, s_error) != 1 || truth(q, s_ended) != 0)
        return 0;
    PyObject *getter = PyObject_GetAttr(q, s_getter);
    if (getter == NULL) {
        PyErr_Clear();
        return 0;
    }
    int waiting = 0;
    if (getter != Py_None) {
        PyObject *done = PyObject_CallMethodNoArgs(getter, s_done);
        waiting = done == Py_False;
        Py_XDECREF(done);
        PyErr_Clear();
    }
    Py_DECREF(getter);
    if (!waiting) return 0;
    PyObject *budgets = PyObject_GetAttr(q, s_budgets);
    if (budgets == NULL || !PyTuple_Check(budgets)) {
        Py_XDECREF(budgets);
        PyErr_Clear();
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(budgets); i++) {
        PyObject *budget = PyTuple_GET_ITEM(budgets, i);
        long long used, held, limit;
        if (integer(budget, s_used, &used) < 0 || integer(budget, s_held, &held) < 0 ||
            integer(budget, s_limit, &limit) < 0 || (used && used + held + size > limit)) {
            Py_DECREF(budgets);
            return 0;
        }
    }
    Py_DECREF(budgets);
    /* Stream.try_write_framed and Connection.send_now on the other side. */
    return writable(lane->out, lane->out_conn, flow);
}

static int relay_frame(Front *self, RelayLane *lane, Py_ssize_t flow) {
    const unsigned char *p = (const unsigned char *)self->buf + 9;
    if (!relay_open(lane, p, flow)) return 0;
    long long id;
    if (integer(lane->out, s_id, &id) < 0) return 0;
    PyObject *frame = PyBytes_FromStringAndSize(NULL, 9 + flow);
    if (frame == NULL) return -1;
    unsigned char *h = (unsigned char *)PyBytes_AS_STRING(frame);
    unsigned long sid = (unsigned long)id;
    h[0] = flow >> 16, h[1] = flow >> 8, h[2] = flow, h[3] = 0, h[4] = 0;
    h[5] = sid >> 24, h[6] = sid >> 16, h[7] = sid >> 8, h[8] = sid;
    memcpy(h + 9, p, flow);
    int r = write_after_deferred(lane->out_conn, frame);
    Py_DECREF(frame);
    if (r < 0) return -1;
    self->passed++;
    PyObject *args[2] = {PyLong_FromSsize_t(flow), PyLong_FromSsize_t(flow - 5)};
    PyObject *done = (args[0] && args[1]) ? PyObject_Vectorcall(lane->after, args, 2, NULL) : NULL;
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    if (done == NULL) return -1;
    Py_DECREF(done);
    return 1;
}

/* 1: the frame went to its lane; 0: not a lane's (nothing done); -1: a Python error is set. */
static int pass_frame(Front *self, Py_ssize_t count) {
    const unsigned char *h = (const unsigned char *)self->buf;
    Py_ssize_t flow = (Py_ssize_t)h[0] << 16 | (Py_ssize_t)h[1] << 8 | h[2];
    if (flow != count - 9 || h[3] != 0 /* DATA */ || h[4] != 0 /* no flags */ || PyDict_GET_SIZE(self->lanes) == 0)
        return 0;
    unsigned long stream_id = ((unsigned long)h[5] & 0x7F) << 24 | (unsigned long)h[6] << 16 | h[7] << 8 | h[8];
    PyObject *key = PyLong_FromUnsignedLong(stream_id);
    if (key == NULL) return -1;
    PyObject *found = PyDict_GetItemWithError(self->lanes, key); /* borrowed */
    Py_DECREF(key);
    if (found == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (Py_IS_TYPE(found, &RelayLaneType)) {
        PyObject *relay = Py_NewRef(found); /* (the dict may drop it while Python runs below) */
        int relayed = relay_frame(self, (RelayLane *)relay, flow);
        Py_DECREF(relay);
        return relayed;
    }
    if (!Py_IS_TYPE(found, &LaneType)) return 0;
    Lane *lane = (Lane *)Py_NewRef(found); /* (the dict may drop it while Python runs below) */
    int result = 0;
    Py_ssize_t start, size;
    const unsigned char *payload = h + 9;
    if (data_payload(payload, flow, lane->max_message, &start, &size) < 0 || !lane_open(lane, flow)) goto done;
    int fd = sender_fd(lane);
    if (fd < 0) goto done;
    ssize_t sent = size ? send(fd, payload + start, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL) : 0;
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) goto done; /* the Python path meets it */
        sent = 0;
    }
    result = 1;
    if (sent < size) { /* the rest goes as DirectSender.offer_data's does, from a task */
        PyObject *rest = PyBytes_FromStringAndSize((const char *)payload + start + sent, size - sent);
        PyObject *r = rest ? PyObject_CallMethodOneArg(lane->sender, s_send_later, rest) : NULL;
        Py_XDECREF(rest);
        if (r == NULL) {
            result = -1;
            goto done;
        }
        Py_DECREF(r);
    }
    self->passed++;
    PyObject *args[2] = {PyLong_FromSsize_t(flow), PyLong_FromSsize_t(size)};
    PyObject *r = (args[0] && args[1]) ? PyObject_Vectorcall(lane->after, args, 2, NULL) : NULL;
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    if (r == NULL)
        result = -1;
    else
        Py_DECREF(r);
done:
    Py_DECREF(lane);
    return result;
}

static PyObject *Front_get_buffer(Front *self, PyObject *sizehint) {
    if (self->idle && !self->busy_reads && (shared_owner == NULL || shared_owner == self)) {
        self->delegated = 0;
        shared_owner = self;
        return Py_NewRef(self->view);
    }
    self->delegated = 1;
    return PyObject_CallOneArg(self->reader_get_buffer, sizehint);
}

static PyObject *Front_buffer_updated(Front *self, PyObject *count_obj) {
    Py_ssize_t count = PyLong_AsSsize_t(count_obj);
    if (count < 0 && PyErr_Occurred()) return NULL;
    if (self->delegated) {
        PyObject *result = PyObject_CallOneArg(self->reader_buffer_updated, count_obj);
        if (result == NULL) return NULL;
        Py_DECREF(result);
        if (self->busy_reads && count < SMALL_READ) self->busy_reads--;
        self->idle = reader_idle(self);
        Py_RETURN_NONE;
    }
    /* Our (the process's) buffer: passed on or copied out before it is let go. */
    int result = 0, fed = 0;
    if (count >= FRONT_BUF) self->busy_reads = QUIET_AFTER;
    if (count >= 9 && truth(self->reader, s_discarding) == 0) result = pass_frame(self, count);
    if (result == 0) {
        fed = 1;
        result = feed(self, count) < 0 ? -1 : 0;
    }
    shared_owner = NULL;
    if (result < 0) return NULL;
    if (fed) self->idle = reader_idle(self); /* (a frame passed on left the reader as it was) */
    Py_RETURN_NONE;
}

static PyObject *Front_passed(Front *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->passed);
}

static PyObject *Front_lanes(Front *self, void *closure) {
    return Py_NewRef(self->lanes);
}

static PyMethodDef Front_methods[] = {
    {"get_buffer", (PyCFunction)Front_get_buffer, METH_O, "The buffer for the transport's next read."},
    {"buffer_updated", (PyCFunction)Front_buffer_updated, METH_O,
     "`count` bytes were read into the last buffer: pass a laned frame on, or hand them to the reader."},
    {NULL}};

static PyGetSetDef Front_getset[] = {
    {"lanes", (getter)Front_lanes, NULL, "The open lanes: stream id -> Lane.", NULL},
    {"passed", (getter)Front_passed, NULL, "Frames passed on in C so far.", NULL},
    {NULL}};

static PyTypeObject FrontType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "osmo_router.h2._front.Front",
    .tp_doc = "A connection's reads, with laned data frames passed on in C (h2/front.py).",
    .tp_basicsize = sizeof(Front),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Front_init,
    .tp_traverse = (traverseproc)Front_traverse,
    .tp_clear = (inquiry)Front_clear,
    .tp_dealloc = (destructor)Front_dealloc,
    .tp_methods = Front_methods,
    .tp_getset = Front_getset,
};

/* ---- SocketLane: a forwarded socket's small reads to the HTTP/2 stream ------------------------------ */

/* The most a readiness callback reads here: a small message, whole; one that fills it is handed to the
 * pump, which reads on in bulk (io/socket_pumps.py SocketReader._read_now). */
#define SOCKET_READ (16 * 1024)
/* Room for a data message's own header (wire/codec.py data_header) of up to SOCKET_READ bytes. */
#define MESSAGE_HEADER 8

typedef struct {
    PyObject_HEAD
    PyObject *reader;   /* io/socket_pumps.SocketReader */
    PyObject *session;  /* ResumableStream */
    PyObject *inner;    /* the FrameStream under it when the lane opened */
    PyObject *writer;   /* its BatchingWriter */
    PyObject *call;     /* its h2 Call */
    PyObject *stream;   /* the call's h2 Stream */
    PyObject *conn;     /* h2 Connection */
    PyObject *buffer;   /* the session's ReplayBuffer */
    PyObject *fallback; /* SocketReader._ready: what the readiness does on the Python path */
    PyObject *hand;     /* SocketReader.hand(item, units, emptied): wake the pump with what was read */
    PyObject *after;    /* after(message, units, length): the bookkeeping of a message sent */
    int fd;
    int hang_up_check;  /* the reader asks poll() for an error or hang-up first (uvloop) */
    unsigned long long sent;
    unsigned char buf[9 + 5 + MESSAGE_HEADER + SOCKET_READ];
} SocketLane;



static int SocketLane_init(SocketLane *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"reader", "session", "inner", "writer", "call", "stream", "conn", "buffer",
                            "fallback", "hand", "after", "fd", "hang_up_check", NULL};
    PyObject *o[11];
    int fd, check;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOOOip", names, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                                     &o[6], &o[7], &o[8], &o[9], &o[10], &fd, &check))
        return -1;
    PyObject **slots[11] = {&self->reader, &self->session, &self->inner,    &self->writer,
                            &self->call,   &self->stream,  &self->conn,     &self->buffer,
                            &self->fallback, &self->hand,  &self->after};
    for (int i = 0; i < 11; i++) Py_XSETREF(*slots[i], Py_NewRef(o[i]));
    self->fd = fd;
    self->hang_up_check = check;
    return 0;
}

#define SOCKET_LANE_FIELDS(DO) \
    DO(reader) DO(session) DO(inner) DO(writer) DO(call) DO(stream) DO(conn) DO(buffer) DO(fallback) DO(hand) DO(after)

static int SocketLane_traverse(SocketLane *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    SOCKET_LANE_FIELDS(VISIT)
    return 0;
}

static int SocketLane_clear(SocketLane *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    SOCKET_LANE_FIELDS(CLEAR)
    return 0;
}

static void SocketLane_dealloc(SocketLane *self) {
    PyObject_GC_UnTrack(self);
    SocketLane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}


/* How many payload bytes may go now, by everything but the read itself; 0: none (the Python path). */
static long long socket_room(SocketLane *self) {
    PyObject *reader = self->reader, *session = self->session, *writer = self->writer, *call = self->call,
             *stream = self->stream, *conn = self->conn, *buffer = self->buffer;
    /* SocketReader._ready: the pump waits (its waiter not done) for the stream's direct sends. */
    PyObject *waiter = PyObject_GetAttr(reader, s_waiter);
    if (waiter == NULL) {
        PyErr_Clear();
        return 0;
    }
    int waiting = 0;
    if (waiter != Py_None) {
        PyObject *done = PyObject_CallMethodNoArgs(waiter, s_done);
        waiting = done == Py_False;
        Py_XDECREF(done);
        PyErr_Clear();
    }
    Py_DECREF(waiter);
    if (!waiting || is_none(reader, s_direct) != 0 || truth(reader, s_hung_up) != 0 || is_none(reader, s_error) != 1 ||
        is_none(reader, s_handed) != 1)
        return 0;
    /* ResumableStream.try_send_data_message: not lost, no send under way, resuming, the same stream under
     * it (a resume's new one takes the Python path), its room the replay buffer's. */
    long long value;
    PyObject *lock = PyObject_GetAttr(session, s_write_lock);
    int locked = lock ? truth(lock, s_locked) : -1;
    Py_XDECREF(lock);
    PyErr_Clear();
    if (locked != 0 || is_none(session, s_lost) != 1 || integer(session, s_sending, &value) < 0 || value ||
        !same(session, s_inner, self->inner) || truth(session, s_resumable) != 1 ||
        truth(session, s_room_by_buffer) != 1)
        return 0;
    /* BatchingWriter.try_write_single: nothing queued, in flight or held this turn. */
    if (is_none(writer, s_try_write) != 0 || is_none(writer, s_error) != 1 || is_none(writer, s_task) != 1 ||
        truth(writer, s_pending) != 0 || truth(writer, s_barriers) != 0 || truth(writer, s_direct_held) != 0)
        return 0;
    /* Call.try_write_serialized and Stream.try_write: the call and the stream open for writing. */
    if (!same(call, s_stream, stream) || is_none(call, s_status) != 1 || truth(call, s_half_closed) != 0 ||
        truth(stream, s_ended_in) != 0 || truth(stream, s_closed_out) != 0 || truth(stream, s_end_pending) != 0 ||
        is_none(stream, s_reset_code) != 1 || truth(stream, s_headers_sent) != 1 || truth(stream, s_out_bytes) != 0)
        return 0;
    /* Connection.send_now: not paused, the transport open, within both windows and the peer's frame size. */
    if (truth(conn, s_write_paused) != 0) return 0;
    PyObject *transport = PyObject_GetAttr(conn, s_transport);
    if (transport == NULL || transport == Py_None) {
        Py_XDECREF(transport);
        PyErr_Clear();
        return 0;
    }
    PyObject *closing = PyObject_CallMethodNoArgs(transport, s_is_closing);
    Py_DECREF(transport);
    int open = closing == Py_False;
    Py_XDECREF(closing);
    PyErr_Clear();
    if (!open) return 0;
    long long room = SOCKET_READ + MESSAGE_HEADER + 5;
    if (integer(stream, s_send_window, &value) < 0) return 0;
    room = value < room ? value : room;
    if (integer(conn, s_send_window, &value) < 0) return 0;
    room = value < room ? value : room;
    if (integer(conn, s_peer_max_frame, &value) < 0) return 0;
    room = value < room ? value : room;
    room -= 5 + MESSAGE_HEADER; /* the gRPC prefix and the message's own header */
    /* ReplayBuffer.fits_now: an empty (or closed) buffer takes anything; else its limit, and the shared
     * window's (resume/window.py SharedWindow, and UserWindow's total). */
    if (truth(buffer, s_entries) == 1 && truth(buffer, s_closed) == 0) {
        long long used, limit;
        if (integer(buffer, s_bytes, &used) < 0 || integer(buffer, s_limit, &limit) < 0) return 0;
        room = limit - used - MESSAGE_HEADER < room ? limit - used - MESSAGE_HEADER : room;
        PyObject *shared = PyObject_GetAttr(buffer, s_shared);
        if (shared == NULL) {
            PyErr_Clear();
            return 0;
        }
        for (PyObject *window = shared; window != Py_None;) {
            if (integer(window, s_used, &used) < 0 || integer(window, s_limit, &limit) < 0) {
                room = 0;
                break;
            }
            room = limit - used - MESSAGE_HEADER < room ? limit - used - MESSAGE_HEADER : room;
            PyObject *total = PyObject_GetAttr(window, s_total); /* UserWindow's; none on a SharedWindow */
            if (total == NULL) {
                PyErr_Clear();
                break;
            }
            Py_DECREF(total); /* (kept alive by the window, which `shared` keeps alive) */
            window = total == window ? Py_None : total;
        }
        Py_DECREF(shared);
    }
    return room > 0 ? room : 0;
}

static int hand_over(SocketLane *self, PyObject *item, Py_ssize_t units, int emptied) {
    PyObject *args[3] = {item, PyLong_FromSsize_t(units), emptied ? Py_True : Py_False};
    if (args[1] == NULL) return -1;
    PyObject *r = PyObject_Vectorcall(self->hand, args, 3, NULL);
    Py_DECREF(args[1]);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The data message's own header (wire/codec.py data_header) for `size` payload bytes, written ending at
 * `end`; its length. */
static int message_header(unsigned char *end, Py_ssize_t size) {
    unsigned char inner[4], outer[4];
    int ni = 0, no = 0;
    for (Py_ssize_t v = size; ; v >>= 7) {
        inner[ni++] = (v & 0x7F) | (v > 0x7F ? 0x80 : 0);
        if (v <= 0x7F) break;
    }
    for (Py_ssize_t v = 1 + ni + size; ; v >>= 7) {
        outer[no++] = (v & 0x7F) | (v > 0x7F ? 0x80 : 0);
        if (v <= 0x7F) break;
    }
    int length = 1 + no + 1 + ni;
    unsigned char *p = end - length;
    *p++ = 0x12;
    memcpy(p, outer, no);
    p += no;
    *p++ = 0x0A;
    memcpy(p, inner, ni);
    return length;
}

/* 1: done here (sent, or handed to the pump); 0: the Python path; -1: a Python error is set. */
static int socket_fast(SocketLane *self) {
    long long room = socket_room(self);
    if (room <= 0) return 0;
    if (self->hang_up_check) {
        struct pollfd check = {.fd = self->fd, .events = POLLERR | POLLHUP};
        if (poll(&check, 1, 0) != 0) return 0; /* (the Python path marks it hung up and reads to the end) */
    }
    unsigned char *payload = self->buf + 9 + 5 + MESSAGE_HEADER;
    Py_ssize_t cap = room < SOCKET_READ ? (Py_ssize_t)room : SOCKET_READ;
    ssize_t got = recv(self->fd, payload, (size_t)cap, MSG_DONTWAIT);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 1; /* a stale readiness */
        PyObject *err = PyObject_CallFunction(PyExc_OSError, "is", errno, strerror(errno));
        if (err == NULL) return -1;
        int r = hand_over(self, err, 0, 1);
        Py_DECREF(err);
        return r < 0 ? -1 : 1;
    }
    if (got == 0) { /* EOF: the pump's */
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        int r = empty ? hand_over(self, empty, 0, 1) : -1;
        Py_XDECREF(empty);
        return r < 0 ? -1 : 1;
    }
    int header = message_header(payload, got);
    Py_ssize_t message_length = header + got;
    PyObject *message = PyBytes_FromStringAndSize((const char *)payload - header, message_length);
    if (message == NULL) return -1;
    if (got == cap) { /* the socket may hold more: the pump reads on in bulk */
        int r = hand_over(self, message, got, 0);
        Py_DECREF(message);
        return r < 0 ? -1 : 1;
    }
    /* The frame: HTTP/2 header, gRPC prefix, the message (Connection.send_now's `head + body`), after the
     * window updates owed to the peer (`_deferred`), as send_now writes them. */
    Py_ssize_t length = message_length + 5;
    unsigned char *h = payload - header - 14;
    unsigned long sid;
    long long id;
    if (integer(self->stream, s_id, &id) < 0) {
        int r = hand_over(self, message, got, 1);
        Py_DECREF(message);
        return r < 0 ? -1 : 1;
    }
    sid = (unsigned long)id;
    h[0] = length >> 16, h[1] = length >> 8, h[2] = length, h[3] = 0, h[4] = 0;
    h[5] = sid >> 24, h[6] = sid >> 16, h[7] = sid >> 8, h[8] = sid;
    h[9] = 0, h[10] = message_length >> 24, h[11] = message_length >> 16, h[12] = message_length >> 8,
    h[13] = message_length;
    PyObject *frame = PyBytes_FromStringAndSize((const char *)h, 14 + message_length);
    PyObject *deferred = frame ? PyObject_GetAttr(self->conn, s_deferred) : NULL;
    PyObject *transport = deferred ? PyObject_GetAttr(self->conn, s_transport) : NULL;
    int ok = transport != NULL;
    if (ok && PyBytes_Check(deferred) && PyBytes_GET_SIZE(deferred)) {
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        PyBytes_Concat(&deferred, frame); /* (steals nothing: deferred is replaced by deferred + frame) */
        ok = deferred != NULL && empty != NULL && PyObject_SetAttr(self->conn, s_deferred, empty) == 0;
        Py_XDECREF(empty);
        Py_XSETREF(frame, Py_XNewRef(deferred));
    }
    PyObject *written = ok ? PyObject_CallMethodOneArg(transport, s_write, frame) : NULL;
    Py_XDECREF(transport);
    Py_XDECREF(deferred);
    Py_XDECREF(frame);
    if (written == NULL) {
        Py_DECREF(message);
        return -1;
    }
    Py_DECREF(written);
    self->sent++;
    PyObject *args[3] = {message, PyLong_FromSsize_t(got), PyLong_FromSsize_t(length)};
    PyObject *r = (args[1] && args[2]) ? PyObject_Vectorcall(self->after, args, 3, NULL) : NULL;
    Py_DECREF(message);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 1;
}

static PyObject *SocketLane_call(SocketLane *self, PyObject *args, PyObject *kwds) {
    int done = socket_fast(self);
    if (done < 0) return NULL;
    if (done) Py_RETURN_NONE;
    return PyObject_CallNoArgs(self->fallback);
}

static PyObject *SocketLane_sent(SocketLane *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->sent);
}

static PyGetSetDef SocketLane_getset[] = {
    {"sent", (getter)SocketLane_sent, NULL, "Messages sent from C so far.", NULL}, {NULL}};

static PyTypeObject SocketLaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "osmo_router.h2._front.SocketLane",
    .tp_doc = "A forwarded socket's readiness callback: small reads sent on its HTTP/2 stream from C.",
    .tp_basicsize = sizeof(SocketLane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SocketLane_init,
    .tp_traverse = (traverseproc)SocketLane_traverse,
    .tp_clear = (inquiry)SocketLane_clear,
    .tp_dealloc = (destructor)SocketLane_dealloc,
    .tp_call = (ternaryfunc)SocketLane_call,
    .tp_getset = SocketLane_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "osmo_router.h2._front",
                                    "The native data path of HTTP/2 connections (h2/front.py).", -1, NULL};

PyMODINIT_FUNC PyInit__front(void) {
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;
    INTERN(s_start, "_start");
    INTERN(s_end, "_end");
    INTERN(s_left, "_left");
    INTERN(s_preface, "_preface");
    INTERN(s_discarding, "discarding");
    INTERN(s_closed, "closed");
    INTERN(s_recv_unacked, "_recv_unacked");
    INTERN(s_connection_window, "_connection_window");
    INTERN(s_reset_code, "reset_code");
    INTERN(s_ended_in, "ended_in");
    INTERN(s_recv_left, "_recv_left");
    INTERN(s_messages, "_messages");
    INTERN(s_need, "_need");
    INTERN(s_head, "_head");
    INTERN(s_listener, "_listener");
    INTERN(s_generation, "_generation");
    INTERN(s_ended, "_ended");
    INTERN(s_resumable, "resumable");
    INTERN(s_data_sink, "_data_sink");
    INTERN(s_data_lane, "_data_lane");
    INTERN(s_handler_waiting, "_handler_waiting");
    INTERN(s_incoming, "_incoming");
    INTERN(s_lost, "_lost");
    INTERN(s_enabled, "enabled");
    INTERN(s_rest, "_rest");
    INTERN(s_sock, "sock");
    INTERN(s_fileno, "fileno");
    INTERN(s_send_later, "send_later");
    INTERN(s_waiter, "_waiter");
    INTERN(s_done, "done");
    INTERN(s_direct, "_direct");
    INTERN(s_hung_up, "_hung_up");
    INTERN(s_error, "_error");
    INTERN(s_handed, "_handed");
    INTERN(s_sending, "_sending");
    INTERN(s_write_lock, "_write_lock");
    INTERN(s_locked, "_locked");
    INTERN(s_inner, "_inner");
    INTERN(s_room_by_buffer, "_room_by_buffer");
    INTERN(s_try_write, "_try_write");
    INTERN(s_task, "_task");
    INTERN(s_pending, "_pending");
    INTERN(s_barriers, "_barriers");
    INTERN(s_direct_held, "_direct_held");
    INTERN(s_stream, "_stream");
    INTERN(s_status, "_status");
    INTERN(s_half_closed, "_half_closed");
    INTERN(s_closed_out, "closed_out");
    INTERN(s_end_pending, "_end_pending");
    INTERN(s_headers_sent, "headers_sent");
    INTERN(s_out_bytes, "_out_bytes");
    INTERN(s_write_paused, "write_paused");
    INTERN(s_transport, "transport");
    INTERN(s_is_closing, "is_closing");
    INTERN(s_send_window, "send_window");
    INTERN(s_peer_max_frame, "_peer_max_frame");
    INTERN(s_entries, "_entries");
    INTERN(s_bytes, "bytes");
    INTERN(s_limit, "limit");
    INTERN(s_shared, "shared");
    INTERN(s_used, "used");
    INTERN(s_total, "total");
    INTERN(s_deferred, "_deferred");
    INTERN(s_write, "write");
    INTERN(s_id, "id");
    INTERN(s_passthrough, "_passthrough");
    INTERN(s_idle, "idle");
    INTERN(s_sink, "_sink");
    INTERN(s_framed, "framed");
    INTERN(s_items, "_items");
    INTERN(s_getter, "_getter");
    INTERN(s_budgets, "_budgets");
    INTERN(s_held, "held");
    if ((shared_view = PyMemoryView_FromMemory(shared_buf, FRONT_BUF, PyBUF_WRITE)) == NULL) return NULL;
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&FrontType) < 0 || PyType_Ready(&SocketLaneType) < 0 ||
        PyType_Ready(&RelayLaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObjectRef(m, "Front", (PyObject *)&FrontType) < 0 ||
        PyModule_AddObjectRef(m, "SocketLane", (PyObject *)&SocketLaneType) < 0 ||
        PyModule_AddObjectRef(m, "RelayLane", (PyObject *)&RelayLaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
