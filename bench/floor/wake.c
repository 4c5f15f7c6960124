// The cost of one wake-up and context switch here: two threads on one CPU waking each other
// through eventfds. `cc -O2 -pthread bench/floor/wake.c -o /tmp/wake && taskset -c 1 /tmp/wake`
// (BENCHMARKS.md, issue 22: what the agent's capture thread handing each batch to the runtime costs).
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdint.h>
#include <unistd.h>
#include <time.h>
static int a, b; static const int N = 200000;
static void *peer(void *x) { uint64_t v; for (int i = 0; i < N; i++) { read(a, &v, 8); v = 1; write(b, &v, 8); } return 0; }
int main(void) {
  a = eventfd(0, 0); b = eventfd(0, 0); pthread_t t; pthread_create(&t, 0, peer, 0);
  struct rusage r0, r1; getrusage(RUSAGE_SELF, &r0); uint64_t v;
  for (int i = 0; i < N; i++) { v = 1; write(a, &v, 8); read(b, &v, 8); }
  getrusage(RUSAGE_SELF, &r1);
  double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + ((r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec)) / 1e6;
  printf("%.2f us CPU per round trip (2 wake-ups + 2 switches)\n", cpu * 1e6 / N);
}
