/* What a seccomp user notification costs, whatever the supervisor does (issue 12, docs/benchmarks.md).
 *
 *   cc -O2 -Wall -Wextra -Werror -o /tmp/notif_roundtrip bench/notif_roundtrip.c
 *   /tmp/notif_roundtrip 200000 0 0   # newfstatat not trapped
 *   /tmp/notif_roundtrip 200000 1 0   # trapped, answered "continue" at once by a C supervisor
 *   /tmp/notif_roundtrip 200000 1 1   # the same with SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (Linux 6.6)
 *
 * A child traps newfstatat and times N lstat calls; the parent answers each with FLAG_CONTINUE and does
 * nothing else: the lower bound of any supervisor's cost per trapped call.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif

static double now(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void send_fd(int sock, int fd)
{
  char c = 0, buf[CMSG_SPACE(sizeof(int))];
  struct iovec io = {&c, 1};
  struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  if (sendmsg(sock, &m, 0) < 0)
    _exit(1);
}

static int recv_fd(int sock)
{
  char c, buf[CMSG_SPACE(sizeof(int))];
  struct iovec io = {&c, 1};
  struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
  int fd;
  if (recvmsg(sock, &m, 0) < 0 || CMSG_FIRSTHDR(&m) == NULL)
    exit(1);
  memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
  return fd;
}

static void child(int sock, int n, int trap)
{
  struct sock_filter f[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_newfstatat, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, trap ? SECCOMP_RET_USER_NOTIF : SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {4, f};
  struct stat st;
  char c;
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
    _exit(1);
  int fd = (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
  send_fd(sock, fd);
  close(fd);
  if (read(sock, &c, 1) != 1)
    _exit(1);
  double t0 = now();
  for (int i = 0; i < n; i++)
    fstatat(AT_FDCWD, "/etc/passwd", &st, AT_SYMLINK_NOFOLLOW);
  printf("trapped=%d: %.2f us per lstat\n", trap, (now() - t0) / n * 1e6);
  fflush(stdout);
  _exit(0);
}

int main(int argc, char **argv)
{
  if (argc != 4)
    return 2;
  int n = atoi(argv[1]), trap = atoi(argv[2]), sync = atoi(argv[3]), sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) != 0)
    return 1;
  pid_t pid = fork();
  if (pid == 0)
    child(sv[1], n, trap);
  int fd = recv_fd(sv[0]);
  if (sync && ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) != 0)
    perror("SECCOMP_IOCTL_NOTIF_SET_FLAGS");
  if (write(sv[0], "x", 1) != 1)
    return 1;
  for (;;) {
    struct seccomp_notif req;
    memset(&req, 0, sizeof req);
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0)
      break;
    struct seccomp_notif_resp resp = {.id = req.id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE};
    ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
  }
  waitpid(pid, NULL, 0);
  return 0;
}
