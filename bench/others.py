# Others' load for the benchmarks (see `others` in bench/common.sh): CPU time of processes neither
# in the given network namespaces nor descendants of ROOT, between `save` and `since`.
#   python3 bench/others.py save|since STATE_FILE ROOT_PID NETNS...
import json, os, sys, time
mode, path, root = sys.argv[1], sys.argv[2], int(sys.argv[3])
ours_ns = {os.stat(f"/run/netns/{n}").st_ino for n in sys.argv[4:]}
procs = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        s = open(f"/proc/{d}/stat").read()
        ino = os.stat(f"/proc/{d}/ns/net").st_ino
    except OSError:
        continue
    f = s[s.rfind(")") + 2:].split()
    if int(f[6]) & 0x00200000:  # kernel thread
        continue
    procs[d] = (int(f[1]), sum(int(x) for x in f[11:15]), ino, f[19])
def ours(pid):
    seen = 0
    while pid in procs and seen < 64:
        ppid, _, ino, _ = procs[pid]
        if int(pid) == root or ino in ours_ns:
            return True
        pid, seen = str(ppid), seen + 1
    return False
now = {p: (v[1], v[3]) for p, v in procs.items() if not ours(p)}
if mode == "save":
    json.dump({"t": time.time(), "p": now}, open(path, "w"))
else:
    old = json.load(open(path))
    ticks = sum(t - (old["p"][p][0] if p in old["p"] and old["p"][p][1] == st else 0) for p, (t, st) in now.items())
    hz = os.sysconf("SC_CLK_TCK")
    print(f"{100 * ticks / hz / (time.time() - old['t']) / os.cpu_count():.0f}%")
