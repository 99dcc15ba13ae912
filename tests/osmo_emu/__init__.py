"""Test emulations of NVIDIA OSMO's own WebSocket router users, written from reading OSMO's source.

- `client.py`: the OSMO CLI side (Python, websockets 11): `src/cli/workflow.py` (exec),
  `src/lib/utils/port_forward.py` (TCP and UDP port-forward) and `src/lib/rsync/rsync.py` (RsyncClient).
- `backend.py`: the backend inside the workload (Go): `src/runtime/cmd/ctrl/ctrl.go` (ctrlUserExec,
  userPortForwardTCP, portforwardConnectTCP, userPortForwardUDP) and `src/runtime/cmd/user/user.go`
  (userExec), with a real `rsync --daemon` standing in for `src/runtime/cmd/rsync/rsync.go`.

None of OSMO's code is copied: each function follows the behaviour of the cited function (framing,
EOF, close, retries) as docs/migration.md describes it. Citations are to NVIDIA/OSMO at the commit
named in docs/migration.md.
"""
