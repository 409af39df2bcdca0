/* rbuild-notify: the fast front of a single-uid RUN's seccomp supervisor (rootless/sandbox/notify.py). */
#ifndef RBUILD_NOTIFY_H
#define RBUILD_NOTIFY_H

#include <linux/seccomp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* What the Python supervisor told this process (ctl messages), and the RUN's USER. */
struct front
{
  int listener;     /* the seccomp listener fd */
  int ctl;          /* SOCK_SEQPACKET to the Python supervisor */
  uint32_t uid, gid; /* USER's ids */
  bool records;     /* some entry of the RUN's tree may hold a user.rbuild.* record ('R') */
  bool ids;         /* some process switched ids: every get*id is Python's ('I') */
};

/* The answer to one notification. */
enum verdict
{
  VERDICT_CONTINUE, /* the kernel carries the call out itself (SECCOMP_USER_NOTIF_FLAG_CONTINUE) */
  VERDICT_VALUE,    /* return `value` */
  VERDICT_FORWARD,  /* the Python supervisor answers it */
};

/* answer.c */
enum verdict answer (const struct front *f, const struct seccomp_notif *req, int64_t *value);

/* proc.c */
bool read_string (pid_t pid, uint64_t addr, char *buf, size_t size);
int open_target (pid_t pid, int dirfd, const char *path, bool follow);
int open_fd_of (pid_t pid, int dirfd);

#endif
