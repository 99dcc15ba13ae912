/* A measuring device for issue 18, not a data path to serve: a C front for one HTTP/2 connection.
 *
 * It stands in for the connection's get_buffer / buffer_updated (asyncio.BufferedProtocol). While the
 * Python frame reader is between frames, reads go into the front's own buffer; a read that is exactly one
 * whole unpadded DATA frame without flags, on a stream with a lane, is passed on from C with no Python
 * frame run before the write:
 *
 *   lane (0, out_conn, out_stream_id)  the router: a new frame header and out_conn.transport.write;
 *   lane (1, fd, sender)               an edge: the gRPC prefix and the data message's two keys and
 *                                      lengths checked, the payload sent to the socket (send(2)); what
 *                                      the socket does not take goes to sender.offer_data.
 *
 * Every 8 KiB passed so, a WINDOW_UPDATE for the connection and the stream goes back (conn.write_frame).
 * Anything else is copied into the Python reader as Connection.data_received does. Like
 * bare_router_hop, it keeps no window, budget, count, resume acknowledgement or order with what Python
 * still holds: the upper bound of what a native data path could take off each turn.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#define FRONT_BUF (16 * 1024)
#define GRANT_EVERY 8192

typedef struct {
    PyObject_HEAD
    PyObject *conn;
    PyObject *reader;
    PyObject *r_get_buffer;
    PyObject *r_buffer_updated;
    PyObject *lanes; /* dict: stream id -> lane tuple */
    PyObject *view;  /* memoryview of buf */
    int delegated;   /* the last buffer handed out was the reader's */
    int idle;        /* the reader is between frames with nothing held */
    Py_ssize_t unacked;
    unsigned long long passed;
    unsigned long long fed;
    char buf[FRONT_BUF];
} Front;

static PyObject *s_start, *s_end, *s_left, *s_preface, *s_discarding, *s_transport, *s_write, *s_deferred,
    *s_closed, *s_write_frame, *s_rest, *s_enabled, *s_offer_data;

static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return 1; /* unknown: not idle, not clear */
    }
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r != 0;
}

static int reader_idle(Front *f) {
    PyObject *start = PyObject_GetAttr(f->reader, s_start);
    PyObject *end = PyObject_GetAttr(f->reader, s_end);
    int same = 0;
    if (start && end) same = PyObject_RichCompareBool(start, end, Py_EQ) == 1;
    Py_XDECREF(start);
    Py_XDECREF(end);
    PyErr_Clear();
    return same && !attr_true(f->reader, s_left) && !attr_true(f->reader, s_preface) &&
           !attr_true(f->reader, s_discarding);
}

static int Front_init(Front *f, PyObject *args, PyObject *kwds) {
    PyObject *conn, *reader;
    if (!PyArg_ParseTuple(args, "OO", &conn, &reader)) return -1;
    Py_INCREF(conn);
    Py_INCREF(reader);
    f->conn = conn;
    f->reader = reader;
    f->r_get_buffer = PyObject_GetAttrString(reader, "get_buffer");
    f->r_buffer_updated = PyObject_GetAttrString(reader, "buffer_updated");
    if (!f->r_get_buffer || !f->r_buffer_updated) return -1;
    f->lanes = PyDict_New();
    f->view = PyMemoryView_FromMemory(f->buf, FRONT_BUF, PyBUF_WRITE);
    if (!f->lanes || !f->view) return -1;
    f->delegated = 0;
    f->idle = 0; /* the preface and SETTINGS go through the reader */
    return 0;
}

static void Front_dealloc(Front *f) {
    Py_XDECREF(f->conn);
    Py_XDECREF(f->reader);
    Py_XDECREF(f->r_get_buffer);
    Py_XDECREF(f->r_buffer_updated);
    Py_XDECREF(f->lanes);
    Py_XDECREF(f->view);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *Front_get_buffer(Front *f, PyObject *sizehint) {
    if (f->idle) {
        f->delegated = 0;
        Py_INCREF(f->view);
        return f->view;
    }
    f->delegated = 1;
    return PyObject_CallOneArg(f->r_get_buffer, sizehint);
}

/* Copy n bytes of our buffer into the reader, as Connection.data_received does. */
static int feed(Front *f, Py_ssize_t n) {
    Py_ssize_t off = 0;
    f->fed++;
    while (off < n) {
        if (attr_true(f->conn, s_closed)) break;
        PyObject *hint = PyLong_FromSsize_t(n - off);
        PyObject *target = PyObject_CallOneArg(f->r_get_buffer, hint);
        Py_DECREF(hint);
        if (!target) return -1;
        Py_buffer tb;
        if (PyObject_GetBuffer(target, &tb, PyBUF_WRITABLE) < 0) {
            Py_DECREF(target);
            return -1;
        }
        Py_ssize_t take = tb.len < n - off ? tb.len : n - off;
        memcpy(tb.buf, f->buf + off, take);
        PyBuffer_Release(&tb);
        Py_DECREF(target);
        off += take;
        PyObject *count = PyLong_FromSsize_t(take);
        PyObject *r = PyObject_CallOneArg(f->r_buffer_updated, count);
        Py_DECREF(count);
        if (!r) return -1;
        Py_DECREF(r);
        if (take == 0) break;
    }
    return 0;
}

static int grant(Front *f, unsigned int sid, Py_ssize_t size) {
    f->unacked += size;
    if (f->unacked < GRANT_EVERY) return 0;
    unsigned char w[26];
    unsigned int inc = (unsigned int)f->unacked;
    f->unacked = 0;
    for (int k = 0; k < 2; k++) {
        unsigned char *p = w + 13 * k;
        unsigned int id = k ? sid : 0;
        p[0] = 0, p[1] = 0, p[2] = 4, p[3] = 8, p[4] = 0;
        p[5] = id >> 24, p[6] = id >> 16, p[7] = id >> 8, p[8] = id;
        p[9] = inc >> 24, p[10] = inc >> 16, p[11] = inc >> 8, p[12] = inc;
    }
    PyObject *b = PyBytes_FromStringAndSize((char *)w, 26);
    if (!b) return -1;
    PyObject *r = PyObject_CallMethodOneArg(f->conn, s_write_frame, b);
    Py_DECREF(b);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* 1: passed on; 0: not this lane's case (nothing done); -1: error. */
static int router_lane(Front *f, PyObject *lane, unsigned int sid, Py_ssize_t len) {
    PyObject *out = PyTuple_GET_ITEM(lane, 1);
    unsigned long out_id = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(lane, 2));
    PyObject *deferred = PyObject_GetAttr(out, s_deferred);
    if (!deferred) {
        PyErr_Clear();
        return 0;
    }
    int owed = PyObject_IsTrue(deferred);
    Py_DECREF(deferred);
    if (owed) return 0; /* window updates owed to the peer go first: Python's path */
    PyObject *transport = PyObject_GetAttr(out, s_transport);
    if (!transport) {
        PyErr_Clear();
        return 0;
    }
    PyObject *b = PyBytes_FromStringAndSize(NULL, 9 + len);
    if (!b) {
        Py_DECREF(transport);
        return -1;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(b);
    memcpy(p, f->buf, 9);
    p[5] = out_id >> 24, p[6] = out_id >> 16, p[7] = out_id >> 8, p[8] = out_id;
    memcpy(p + 9, f->buf + 9, len);
    PyObject *r = PyObject_CallMethodOneArg(transport, s_write, b);
    Py_DECREF(b);
    Py_DECREF(transport);
    if (!r) return -1;
    Py_DECREF(r);
    return 1;
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

static int edge_lane(Front *f, PyObject *lane, Py_ssize_t len) {
    const unsigned char *p = (const unsigned char *)f->buf + 9;
    if (len < 9 || p[0] || ((Py_ssize_t)p[1] << 24 | p[2] << 16 | p[3] << 8 | p[4]) != len - 5 || p[5] != 0x12)
        return 0;
    Py_ssize_t pos = 6;
    unsigned long long a, b;
    if (!varint(p, len, &pos, &a) || pos + (Py_ssize_t)a != len || pos >= len || p[pos++] != 0x0A) return 0;
    if (!varint(p, len, &pos, &b) || pos + (Py_ssize_t)b != len) return 0;
    PyObject *sender = PyTuple_GET_ITEM(lane, 2);
    if (!attr_true(sender, s_enabled)) return 0;
    PyObject *rest = PyObject_GetAttr(sender, s_rest);
    if (!rest) {
        PyErr_Clear();
        return 0;
    }
    int busy = rest != Py_None;
    Py_DECREF(rest);
    if (busy) return 0;
    int fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(lane, 1));
    ssize_t sent = send(fd, p + pos, b, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return 0;
        sent = 0;
    }
    if ((unsigned long long)sent < b) {
        PyObject *left = PyBytes_FromStringAndSize((const char *)p + pos + sent, b - sent);
        if (!left) return -1;
        PyObject *r = PyObject_CallMethodOneArg(sender, s_offer_data, left);
        Py_DECREF(left);
        if (!r) return -1;
        Py_DECREF(r);
    }
    return 1;
}

static PyObject *Front_buffer_updated(Front *f, PyObject *count) {
    Py_ssize_t n = PyLong_AsSsize_t(count);
    if (n < 0 && PyErr_Occurred()) return NULL;
    if (f->delegated) {
        PyObject *r = PyObject_CallOneArg(f->r_buffer_updated, count);
        if (!r) return NULL;
        Py_DECREF(r);
        f->idle = reader_idle(f);
        Py_RETURN_NONE;
    }
    if (n >= 9) {
        const unsigned char *h = (const unsigned char *)f->buf;
        Py_ssize_t len = (Py_ssize_t)h[0] << 16 | h[1] << 8 | h[2];
        unsigned int sid = ((unsigned int)h[5] & 0x7F) << 24 | h[6] << 16 | h[7] << 8 | h[8];
        if (len == n - 9 && h[3] == 0 && h[4] == 0 && PyDict_GET_SIZE(f->lanes)) {
            PyObject *key = PyLong_FromUnsignedLong(sid);
            PyObject *lane = PyDict_GetItemWithError(f->lanes, key); /* borrowed */
            Py_DECREF(key);
            if (lane && !attr_true(f->reader, s_discarding)) {
                int done = PyLong_AsLong(PyTuple_GET_ITEM(lane, 0)) ? edge_lane(f, lane, len)
                                                                    : router_lane(f, lane, sid, len);
                if (done < 0) return NULL;
                if (done) {
                    f->passed++;
                    if (grant(f, sid, len) < 0) return NULL;
                    Py_RETURN_NONE;
                }
            }
            PyErr_Clear();
        }
    }
    if (feed(f, n) < 0) return NULL;
    f->idle = reader_idle(f);
    Py_RETURN_NONE;
}

static PyObject *Front_counts(Front *f, PyObject *unused) {
    return Py_BuildValue("(KK)", f->passed, f->fed);
}

static PyMethodDef Front_methods[] = {
    {"get_buffer", (PyCFunction)Front_get_buffer, METH_O, "The buffer for the transport's next read."},
    {"buffer_updated", (PyCFunction)Front_buffer_updated, METH_O, "Bytes were read into the last buffer."},
    {"counts", (PyCFunction)Front_counts, METH_NOARGS, "(frames passed in C, reads fed to the reader)."},
    {NULL}};

static PyObject *Front_lanes(Front *f, void *closure) {
    Py_INCREF(f->lanes);
    return f->lanes;
}

static PyGetSetDef Front_getset[] = {{"lanes", (getter)Front_lanes, NULL, "stream id -> lane", NULL}, {NULL}};

static PyTypeObject FrontType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_cfront.Front",
    .tp_basicsize = sizeof(Front),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Front_init,
    .tp_dealloc = (destructor)Front_dealloc,
    .tp_methods = Front_methods,
    .tp_getset = Front_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cfront", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__cfront(void) {
#define NAME(var, text) \
    if (!(var = PyUnicode_InternFromString(text))) return NULL;
    NAME(s_start, "_start");
    NAME(s_end, "_end");
    NAME(s_left, "_left");
    NAME(s_preface, "_preface");
    NAME(s_discarding, "discarding");
    NAME(s_transport, "transport");
    NAME(s_write, "write");
    NAME(s_deferred, "_deferred");
    NAME(s_closed, "closed");
    NAME(s_write_frame, "write_frame");
    NAME(s_rest, "_rest");
    NAME(s_enabled, "enabled");
    NAME(s_offer_data, "offer_data");
    if (PyType_Ready(&FrontType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FrontType);
    PyModule_AddObject(m, "Front", (PyObject *)&FrontType);
    return m;
}
