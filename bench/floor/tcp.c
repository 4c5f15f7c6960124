// Transport floor (bench/mirror.sh, ONLY=floor): a plain TCP connection (no TLS, no HTTP/2) carrying
// RATE records of SIZE+16 bytes a second (a packet and its framing), written once per ms as the
// agent writes one batch per capture block. `send` prints its CPU per record; `recv PORT SIZE`
// reads and discards until EOF and prints its own. CPU is utime+stime (getrusage), softirq work
// done in the process's context included.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static double cpu(void) { struct rusage r; getrusage(RUSAGE_SELF, &r); return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6; }
int main(int argc, char **argv) {
  int one = 1;
  if (argc >= 4 && !strcmp(argv[1], "recv")) {
    int port = atoi(argv[2]), size = atoi(argv[3]);
    int l = socket(AF_INET, SOCK_STREAM, 0); setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1)) { perror("listen"); return 1; }
    int c = accept(l, 0, 0); setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    static char buf[1 << 18]; long total = 0; double c0 = cpu(); ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0) total += n;
    long recs = total / (size + 16);
    printf("recv size=%d records=%ld cpu_per_record_us=%.2f\n", size, recs, (cpu() - c0) * 1e6 / recs);
    return 0;
  }
  if (argc < 7) { fprintf(stderr, "usage: send HOST PORT SIZE RATE SECS | recv PORT SIZE\n"); return 2; }
  int size = atoi(argv[4]), rate = atoi(argv[5]), secs = atoi(argv[6]);
  int s = socket(AF_INET, SOCK_STREAM, 0); setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
  inet_pton(AF_INET, argv[2], &a.sin_addr);
  if (connect(s, (void *)&a, sizeof a)) { perror("connect"); return 1; }
  int per_tick = rate / 1000; size_t chunk = (size_t)per_tick * (size + 16);
  char *buf = calloc(1, chunk); long recs = 0; double c0 = cpu(), t0 = now(), next = t0;
  while (now() - t0 < secs) {
    size_t off = 0; while (off < chunk) { ssize_t n = write(s, buf + off, chunk - off); if (n <= 0) return 1; off += n; }
    recs += per_tick;
    next += 0.001; double d = next - now();
    if (d > 0) { struct timespec ts = { 0, (long)(d * 1e9) }; nanosleep(&ts, 0); }
  }
  printf("send size=%d rate=%d records=%ld cpu_per_record_us=%.2f\n", size, rate, recs, (cpu() - c0) * 1e6 / recs);
  close(s);
  return 0;
}
