/* vsend PORT: copies stdin to a vsock stream connection to the host (CID 2) on PORT, then exits 0.
 *
 * The guest half of the Firecracker comparison in ../TRIPLE-FAULT.md: inside a Firecracker guest,
 * `head -c N /dev/zero | vsend 1234` puts the same load on the guest (a pipe, then AF_VSOCK through
 * virtio-vsock) as `vmm --cmd 'head -c N /dev/zero'` does through guest-init. Firecracker forwards the
 * connection to the Unix socket UDS_PATH_1234 on its host, where fc-sink.py counts and hashes it.
 * Static: gcc -static -O2 -o vsend vsend.c (the test image has no libc). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: vsend PORT < data\n");
    return 2;
  }
  struct sockaddr_vm addr;
  memset(&addr, 0, sizeof addr);
  addr.svm_family = AF_VSOCK;
  addr.svm_cid = VMADDR_CID_HOST;
  addr.svm_port = (unsigned)strtoul(argv[1], NULL, 10);
  int s = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
    perror("vsend: connect");
    return 1;
  }
  static char buf[64 * 1024];
  unsigned long long total = 0;
  for (;;) {
    ssize_t r = read(0, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      perror("vsend: read");
      return 1;
    }
    if (r == 0) break;
    if (write_all(s, buf, (size_t)r) < 0) {
      perror("vsend: write");
      return 1;
    }
    total += (unsigned long long)r;
  }
  /* wait for fc-sink.py's one-byte acknowledgement that it has everything (or its close), so that
   * nothing is lost in flight when the guest resets; at most 30 s, so that a lost one cannot hold the
   * run up */
  alarm(30);
  while (read(s, buf, sizeof buf) < 0 && errno == EINTR) {
  }
  fprintf(stderr, "vsend: %llu bytes sent\n", total);
  return 0;
}
