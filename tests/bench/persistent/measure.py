"""Runs a command and measures its whole process tree (standard library only):

    python3 measure.py OUT -- command args...

Writes one line to OUT: `wall_s cpu_s peak_rss_kib exit_code`.
- cpu_s: user + system time of the command and every process below it, the
  larger of the kernel's count for reaped descendants (wait4) and the sum of
  the last /proc sample of every process seen (which also counts children
  that were never reaped).
- peak_rss_kib: the largest sum of VmRSS over the tree, sampled every 50 ms.
"""

import os
import resource
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ppid = int(fields[1])
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        kids.setdefault(ppid, []).append((int(name), cpu))
    return kids


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    started = time.monotonic()
    child = subprocess.Popen(cmd)
    peak, last_cpu = 0, {}
    while child.poll() is None:
        kids = children_map()
        tree, todo = [], [os.getpid()]
        while todo:
            for kid, cpu in kids.get(todo.pop(), []):
                last_cpu[kid] = cpu
                tree.append(kid)
                todo.append(kid)
        peak = max(peak, sum(rss_kib(p) for p in tree))
        time.sleep(0.05)
    wall = time.monotonic() - started
    # poll() reaped it; its rusage and that of the descendants it reaped:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    waited = usage.ru_utime + usage.ru_stime
    sampled = sum(last_cpu.values())
    with open(out, "w") as f:
        f.write(f"{wall:.4f} {max(waited, sampled):.3f} {peak} {child.returncode}\n")


if __name__ == "__main__":
    main()
