/* The calls answered here: get*id while no process switched ids, and stat of regular files and
 * directories (the recorded owner written into the answer).
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
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
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

/* Whether the list of xattr names holds `name`. */
static bool has_name (const char *names, ssize_t len, const char *name)
{
  for (ssize_t i = 0; i < len; i += (ssize_t) strlen (names + i) + 1)
    if (strcmp (names + i, name) == 0)
      return true;
  return false;
}

/* An id of a user.rbuild.stat record: 1-10 digits, at most 2^32 - 2 (layers.py's rule); NULL if not. */
static const char *parse_id (const char *s, uint32_t *id)
{
  uint64_t v = 0;
  const char *p = s;
  while (*p >= '0' && *p <= '9' && p - s < 10)
    v = v * 10 + (uint64_t) (*p++ - '0');
  if (p == s || (*p >= '0' && *p <= '9') || v > UINT32_MAX - 1)
    return NULL;
  *id = (uint32_t) v;
  return p;
}

/* The owner a user.rbuild.stat record ("UID:GID") names for the entry open as fd; false if none or
 * malformed (the Python supervisor reports that). */
static bool recorded_owner (int fd, uint32_t *uid, uint32_t *gid)
{
  char link[64], value[32];
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = getxattr (link, "user.rbuild.stat", value, sizeof value - 1);
  if (n <= 0)
    return false;
  value[n] = '\0';
  const char *p = parse_id (value, uid);
  if (p == NULL || *p != ':')
    return false;
  p = parse_id (p + 1, gid);
  return p != NULL && *p == '\0';
}

#define AT_STATX_SYNC_MASK 0x6000 /* AT_STATX_SYNC_TYPE */

/* The kernel's answer for the entry open as fd with the recorded owner in it, written to the caller's
 * buffer (as Supervisor._stat_with does); FORWARD where that cannot be done here. */
static enum verdict rewrite (const struct front *f, const struct seccomp_notif *req, int fd, int flags,
                             uint64_t mask, uint64_t buf, uint32_t uid, uint32_t gid)
{
  unsigned char out[256];
  size_t size, at;
  long rc;
  memset (out, 0, sizeof out);
  if (req->data.nr == __NR_statx)
    {
      rc = syscall (__NR_statx, fd, "", AT_EMPTY_PATH | (flags & AT_STATX_SYNC_MASK), (unsigned) mask, out);
      size = 256, at = 20; /* stx_uid, stx_gid */
    }
  else
    {
      rc = syscall (__NR_newfstatat, fd, "", out, AT_EMPTY_PATH);
      size = 144, at = 28; /* x86_64 struct stat: st_uid, st_gid */
    }
  if (rc != 0)
    return VERDICT_CONTINUE;
  memcpy (out + at, &uid, sizeof uid);
  memcpy (out + at + 4, &gid, sizeof gid);
  __u64 id = req->id;
  if (ioctl (f->listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) != 0)
    return VERDICT_CONTINUE; /* the caller is gone: no answer reaches anyone (its pid may be reused) */
  struct iovec local = { out, size };
  struct iovec remote = { (void *) (uintptr_t) buf, size };
  if (process_vm_writev ((pid_t) req->pid, &local, 1, &remote, 1, 0) != (ssize_t) size)
    return VERDICT_FORWARD; /* /proc/PID/mem writes where this cannot, or the answer is EFAULT */
  return VERDICT_VALUE;
}

/* The xattr names of the entry open (O_PATH) as fd. Through /proc/self/fd: listxattrat(2) refuses an
 * O_PATH fd (EBADF, Linux 6.18), and opening the entry for real would open an overlay's lower file. */
static ssize_t list_xattrs (int fd, char *names, size_t size)
{
  char link[64];
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  return listxattr (link, names, size);
}

static enum verdict stat_call (const struct front *f, const struct seccomp_notif *req, int64_t *value)
{
  const __u64 *a = req->data.args;
  int nr = req->data.nr, dirfd, flags;
  uint64_t path_addr;
  if (!f->records && f->uid == 0)
    return VERDICT_CONTINUE; /* nothing to show but what the kernel shows */
  if (f->uid != 0)
    return VERDICT_FORWARD; /* what the RUN made is USER's: the Python supervisor tells it */
  uint64_t mask = 0, buf;
  if (nr == __NR_statx)
    dirfd = sint (a[0]), path_addr = a[1], flags = sint (a[2]), mask = a[3], buf = a[4];
  else if (!STAT_REWRITTEN)
    return VERDICT_CONTINUE;
  else if (nr == __NR_newfstatat)
    dirfd = sint (a[0]), path_addr = a[1], flags = sint (a[3]), buf = a[2];
#ifdef __NR_fstat
  else if (nr == __NR_fstat)
    dirfd = sint (a[0]), path_addr = 0, flags = AT_EMPTY_PATH, buf = a[1];
#endif
#ifdef __NR_stat
  else if (nr == __NR_stat || nr == __NR_lstat)
    dirfd = AT_FDCWD, path_addr = a[0], flags = nr == __NR_lstat ? AT_SYMLINK_NOFOLLOW : 0, buf = a[1];
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
  if (has_name (names, len, "user.rbuild.dev"))
    return VERDICT_FORWARD; /* shown as a device: Python's */
  if (!has_name (names, len, "user.rbuild.stat"))
    return VERDICT_CONTINUE;
  uint32_t uid, gid;
  if (!recorded_owner (tfd, &uid, &gid))
    return VERDICT_FORWARD;
  *value = 0;
  return rewrite (f, req, tfd, flags, mask, buf, uid, gid);
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
  return stat_family ? stat_call (f, req, value) : VERDICT_FORWARD;
}
