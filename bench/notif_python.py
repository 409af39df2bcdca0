"""What the single-uid supervisor costs per trapped call (issue 12): rbuild's own answer loop, timed.

    python bench/notif_python.py [--src CHECKOUT] [--calls N] [--helper rbuild-notify|none]

bench/notif_client.c (compiled here) traps getuid and lstat and hands its listener fd to
`rootless.sandbox.notify.Supervisor` of the checkout `--src` (default: this one; give another to A/B
two revisions in one run). Cases: a root RUN whose lowers hold no record (both calls answered "continue"
without a look), one whose lowers hold a record (each lstat resolves the path and reads its
xattrs), and the lstat of a file holding a record (its owner rewritten into the answer). Prints
microseconds per call; an untrapped lstat costs about 1.3 us here.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--helper", help="rbuild-notify to front the supervisor with, or `none` (revisions that have one)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.src))
    from rootless.sandbox import notify

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        client = os.path.join(tmp, "notif_client")
        subprocess.run(["cc", "-O2", "-o", client, os.path.join(here, "notif_client.c")], check=True)
        plain, marked = os.path.join(tmp, "plain"), os.path.join(tmp, "marked")
        os.makedirs(plain)
        os.makedirs(marked)
        os.setxattr(marked, "user.rbuild.stat", b"5:5")
        cases = (
            ("lowers without records", [plain], "/etc/passwd"),
            ("lowers with a record", [marked], "/etc/passwd"),
            ("the file holds a record", [marked], marked),  # answered by Python (forwarded by rbuild-notify)
        )
        for name, lowers, path in cases:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            extra = {} if args.helper is None else {"helper": None if args.helper == "none" else args.helper}
            sup = notify.Supervisor(ours, notify.Creds.of(0, 0, [0]), lowers, "", **extra)
            sup.start()
            out = subprocess.run(
                [client, str(theirs.fileno()), str(args.calls), path],
                pass_fds=(theirs.fileno(),),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            theirs.close()
            sup.stop()
            print(f"{name}: {out.strip()} (us per call; {sup.errors or 'no errors'})")


if __name__ == "__main__":
    main()
