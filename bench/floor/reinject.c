// Reinjection floor (bench/mirror.sh, ONLY=floor): frames of SIZE bytes into interface IF over
// AF_PACKET, RATE frames/s in 1 ms bursts (one capture block's worth) for SECS, either one sendmmsg
// per BATCH frames (tapgraph's writer), one send per frame (BATCH 0: tcpreplay's pcap_inject), or
// a PACKET_TX_RING flushed by one send per burst (BATCH -1). BYPASS=1 in the environment sets
// PACKET_QDISC_BYPASS on the socket (the ring is measured both ways too).
// The frames are addressed to another host, as mirrored frames are, so the receiving side drops
// them where it drops those. Prints this process's CPU (utime+stime, softirq work done in its
// context included) per frame.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  if (argc < 6) { fprintf(stderr, "usage: IF SIZE RATE SECS BATCH (BATCH 0: send per frame)\n"); return 2; }
  const char *ifn = argv[1]; int size = atoi(argv[2]), rate = atoi(argv[3]), secs = atoi(argv[4]), batch = atoi(argv[5]);
  int fd = socket(AF_PACKET, SOCK_RAW, 0);
  struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_ifindex = if_nametoindex(ifn) };
  if (fd < 0 || bind(fd, (void *)&sll, sizeof sll)) { perror("socket/bind"); return 1; }
  int bypass = getenv("BYPASS") && atoi(getenv("BYPASS"));
  if (bypass && setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &bypass, sizeof bypass)) { perror("PACKET_QDISC_BYPASS"); return 1; }
  /* TX ring: TPACKET_V2 slots of 2 KiB (a frame up to the MTU), 4096 of them. */
  const unsigned slot = 2048, slots = 4096; unsigned char *ring = 0; unsigned head = 0;
  if (batch < 0) {
    int v = TPACKET_V2;
    struct tpacket_req req = { .tp_block_size = 1 << 20, .tp_frame_size = slot };
    req.tp_block_nr = slots * slot / req.tp_block_size; req.tp_frame_nr = slots;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) || setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof req)) { perror("PACKET_TX_RING"); return 1; }
    ring = mmap(0, (size_t)slots * slot, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring == MAP_FAILED) { perror("mmap"); return 1; }
  }
  int per_tick = rate / 1000;           /* one burst per ms, like 1 ms capture blocks */
  if (per_tick < 1) per_tick = 1;
  unsigned char *frames = calloc(per_tick, size);
  for (int i = 0; i < per_tick; i++) {
    unsigned char *f = frames + i * size;
    f[0] = 2; f[5] = 1; f[6] = 2; f[11] = 2; f[12] = 0x08; f[14] = 0x45; /* unicast, IPv4 */
  }
  struct mmsghdr *m = calloc(per_tick, sizeof *m); struct iovec *iov = calloc(per_tick, sizeof *iov);
  for (int i = 0; i < per_tick; i++) { iov[i].iov_base = frames + i * size; iov[i].iov_len = size; m[i].msg_hdr.msg_iov = &iov[i]; m[i].msg_hdr.msg_iovlen = 1; }
  struct rusage r0, r1; getrusage(RUSAGE_SELF, &r0);
  double t0 = now(), next = t0; long sent = 0;
  while (now() - t0 < secs) {
    if (batch < 0) {
      for (int i = 0; i < per_tick; i++) {
        struct tpacket2_hdr *h = (void *)(ring + (size_t)head * slot);
        while (h->tp_status & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING)) send(fd, 0, 0, 0); /* ring full: flush, wait */
        memcpy((unsigned char *)h + TPACKET2_HDRLEN - sizeof(struct sockaddr_ll), frames + i * size, size);
        h->tp_len = size; __sync_synchronize(); h->tp_status = TP_STATUS_SEND_REQUEST;
        head = (head + 1) % slots;
      }
      if (send(fd, 0, 0, 0) >= 0) sent += per_tick;
    } else if (batch > 0) {
      for (int i = 0; i < per_tick; i += batch) {
        int n = per_tick - i < batch ? per_tick - i : batch;
        int k = sendmmsg(fd, m + i, n, 0); if (k > 0) sent += k;
      }
    } else {
      for (int i = 0; i < per_tick; i++) if (send(fd, frames + i * size, size, 0) == size) sent++;
    }
    next += 0.001; double d = next - now();
    if (d > 0) { struct timespec ts = { 0, (long)(d * 1e9) }; nanosleep(&ts, 0); }
  }
  getrusage(RUSAGE_SELF, &r1);
  double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) / 1e6
             + (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1e6;
  printf("size=%d rate=%d batch=%d bypass=%d sent=%ld cpu_per_frame_us=%.2f\n", size, rate, batch, bypass, sent, cpu * 1e6 / sent);
  return 0;
}
