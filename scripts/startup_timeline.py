"""Print a server log's lines with their time since launch: where start-up goes.

usage: python3 scripts/startup_timeline.py SERVER_LOG LAUNCH_EPOCH_SECONDS
"""
import re
import sys
from datetime import datetime

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def main() -> None:
    path, t0 = sys.argv[1], float(sys.argv[2])
    for line in open(path, errors="replace"):
        m = STAMP.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            print(f"{t - t0:6.2f} s  {line[m.end():].lstrip('] ').strip()[:150]}")


if __name__ == "__main__":
    main()
