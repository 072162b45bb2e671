"""``python -m ema_tool ARGS``: run the ``ema-tool`` binary with ARGS."""

import os
import subprocess
import sys

from ema_tool import find_ema_tool_bin


def main() -> None:
    try:
        binary = find_ema_tool_bin()
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    argv = [binary, *sys.argv[1:]]
    if sys.platform == "win32":
        # Windows has no exec: run it and pass its exit status on.
        sys.exit(subprocess.call(argv))
    # Replace this process, so signals, exit status and the terminal are the binary's own.
    os.execv(binary, argv)


if __name__ == "__main__":
    main()
