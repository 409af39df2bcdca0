/* The calls answered here: get*id while no process switched ids, and stat of what holds no record.
 *
 * The same answers rootless/sandbox/notify.py gives (Supervisor._ids, Supervisor._stat), for the
 * common case only; anything else is forwarded to it. Only the machine's own ABI is looked at.
 */
#define _GNU_SOURCE
#include "notify.h"

#include "../util.h"

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <linux/audit.h>
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#define STAT_REWRITTEN 1 /* the Python supervisor rewrites struct stat on this ABI only (statx everywhere) */
#define X32_BIT 0x40000000U
#elif defined(__aarch64__)
#include <linux/audit.h>
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#define STAT_REWRITTEN 0
#define X32_BIT 0U
#else
#define NATIVE_ARCH 0 /* unknown: everything is forwarded */
#define STAT_REWRITTEN 0
#define X32_BIT 0U
#endif

static int sint (uint64_t v)
{
  return (int) (int32_t) (uint32_t) v;
}

static enum verdict ids (const struct front *f, int nr, int64_t *value)
{
  if (f->ids)
    return VERDICT_FORWARD;
  if (f->uid == 0 && f->gid == 0)
    return VERDICT_CONTINUE; /* a root RUN where no process switched ids: the kernel's answer is the one */
  if (nr == __NR_getuid || nr == __NR_geteuid)
    *value = f->uid;
  else if (nr == __NR_getgid || nr == __NR_getegid)
    *value = f->gid;
  else
    return VERDICT_FORWARD; /* getres*id, getgroups: written to the caller's memory */
  return VERDICT_VALUE;
}

/* Whether the list of xattr names holds one of rbuild's owner or device records. */
static bool has_record (const char *names, ssize_t len)
{
  for (ssize_t i = 0; i < len; i += (ssize_t) strlen (names + i) + 1)
    if (strcmp (names + i, "user.rbuild.stat") == 0 || strcmp (names + i, "user.rbuild.dev") == 0)
      return true;
  return false;
}

/* The xattr names of the entry open (O_PATH) as fd. Through /proc/self/fd: listxattrat(2) refuses an
 * O_PATH fd (EBADF, Linux 6.18), and opening the entry for real would open an overlay's lower file. */
static ssize_t list_xattrs (int fd, char *names, size_t size)
{
  char link[64];
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  return listxattr (link, names, size);
}

static enum verdict stat_call (const struct front *f, const struct seccomp_notif *req)
{
  const __u64 *a = req->data.args;
  int nr = req->data.nr, dirfd, flags;
  uint64_t path_addr;
  if (!f->records && f->uid == 0)
    return VERDICT_CONTINUE; /* nothing to show but what the kernel shows */
  if (f->uid != 0)
    return VERDICT_FORWARD; /* what the RUN made is USER's: the Python supervisor tells it */
  if (nr == __NR_statx)
    dirfd = sint (a[0]), path_addr = a[1], flags = sint (a[2]);
  else if (!STAT_REWRITTEN)
    return VERDICT_CONTINUE;
  else if (nr == __NR_newfstatat)
    dirfd = sint (a[0]), path_addr = a[1], flags = sint (a[3]);
#ifdef __NR_fstat
  else if (nr == __NR_fstat)
    dirfd = sint (a[0]), path_addr = 0, flags = AT_EMPTY_PATH;
#endif
#ifdef __NR_stat
  else if (nr == __NR_stat || nr == __NR_lstat)
    dirfd = AT_FDCWD, path_addr = a[0], flags = nr == __NR_lstat ? AT_SYMLINK_NOFOLLOW : 0;
#endif
  else
    return VERDICT_FORWARD;

  char path[PATH_MAX];
  path[0] = '\0';
  if (path_addr != 0 && !read_string ((pid_t) req->pid, path_addr, path, sizeof path))
    return VERDICT_CONTINUE; /* EFAULT, ENAMETOOLONG: the kernel says so */
  cleanup_fd int tfd = -1;
  if (path[0] == '\0')
    {
      if (!(flags & AT_EMPTY_PATH))
        return VERDICT_CONTINUE; /* ENOENT */
      tfd = open_fd_of ((pid_t) req->pid, dirfd);
    }
  else
    tfd = open_target ((pid_t) req->pid, dirfd, path, !(flags & AT_SYMLINK_NOFOLLOW));
  if (tfd < 0)
    return VERDICT_CONTINUE; /* no such entry (or not one of the tree): the kernel's answer */

  struct stat st;
  if (fstat (tfd, &st) != 0)
    return VERDICT_CONTINUE;
  char names[4096];
  if (!S_ISREG (st.st_mode) && !S_ISDIR (st.st_mode))
    {
      /* a pipe or socket of no directory (fstat of stdout): nothing records it */
      char link[64];
      snprintf (link, sizeof link, "/proc/self/fd/%d", tfd);
      ssize_t n = readlink (link, names, sizeof names);
      if (n > 0 && names[0] != '/')
        return VERDICT_CONTINUE;
      return VERDICT_FORWARD; /* a symlink's or fifo's owner is in its parent's record */
    }
  ssize_t len = list_xattrs (tfd, names, sizeof names);
  if (len < 0)
    return errno == ERANGE ? VERDICT_FORWARD : VERDICT_CONTINUE;
  return has_record (names, len) ? VERDICT_FORWARD : VERDICT_CONTINUE;
}

enum verdict answer (const struct front *f, const struct seccomp_notif *req, int64_t *value)
{
  if (NATIVE_ARCH == 0 || req->data.arch != NATIVE_ARCH || ((uint32_t) req->data.nr & X32_BIT))
    return VERDICT_FORWARD;
  int nr = req->data.nr;
  if (nr == __NR_getuid || nr == __NR_geteuid || nr == __NR_getgid || nr == __NR_getegid || nr == __NR_getresuid
      || nr == __NR_getresgid || nr == __NR_getgroups)
    return ids (f, nr, value);
  bool stat_family = nr == __NR_newfstatat || nr == __NR_statx;
#ifdef __NR_stat
  stat_family = stat_family || nr == __NR_stat || nr == __NR_lstat;
#endif
#ifdef __NR_fstat
  stat_family = stat_family || nr == __NR_fstat;
#endif
  return stat_family ? stat_call (f, req) : VERDICT_FORWARD;
}
