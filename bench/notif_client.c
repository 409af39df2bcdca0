/* A trapped process for timing a supervisor's answers (bench/notif_python.py; docs/benchmarks.md).
 *
 *   cc -O2 -Wall -Wextra -Werror -o /tmp/notif_client bench/notif_client.c
 *   notif_client SOCKFD N PATH
 *
 * Traps getuid and newfstatat (SECCOMP_RET_USER_NOTIF), sends the listener fd over SOCKFD (SCM_RIGHTS),
 * then times N getuid and N lstat(PATH) calls and prints "getuid US lstat US"
 * (microseconds per call).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
  if (argc != 4)
    return 2;
  int sock = atoi(argv[1]), n = atoi(argv[2]);
  struct sock_filter f[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_newfstatat, 2, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getuid, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
  };
  struct sock_fprog prog = {5, f};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
    return 1;
  int fd = (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
  if (fd < 0)
    return 1;
  char c = 0, buf[CMSG_SPACE(sizeof(int))];
  struct iovec io = {&c, 1};
  struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
  struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  if (sendmsg(sock, &m, 0) < 0)
    return 1;
  close(fd);
  close(sock);
  struct stat st;
  double t0 = now();
  for (int i = 0; i < n; i++)
    (void)syscall(__NR_getuid);
  double t1 = now();
  for (int i = 0; i < n; i++)
    fstatat(AT_FDCWD, argv[3], &st, AT_SYMLINK_NOFOLLOW);
  double t2 = now();
  printf("getuid %.2f lstat %.2f\n", (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6);
  return 0;
}
