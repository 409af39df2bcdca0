/* A trapped process's memory and paths, as it sees them (its cwd, fds and root, from /proc).
 *
 * Only used to decide that the kernel may carry a stat out itself: a stale pid (reused meanwhile) can
 * at worst send a call to the Python supervisor that needed none, never give a wrong answer.
 */
#define _GNU_SOURCE
#include "notify.h"

#include "../util.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096

/* The NUL-terminated string at addr in pid (at most size - 1 bytes), false if unreadable or longer. */
bool read_string (pid_t pid, uint64_t addr, char *buf, size_t size)
{
  size_t got = 0;
  if (addr == 0)
    return false;
  while (got < size)
    {
      size_t want = PAGE - (size_t) ((addr + got) % PAGE); /* never across a page: the next may be unmapped */
      if (want > size - got)
        want = size - got;
      struct iovec local = { buf + got, want };
      struct iovec remote = { (void *) (uintptr_t) (addr + got), want };
      ssize_t n = process_vm_readv (pid, &local, 1, &remote, 1, 0);
      if (n <= 0)
        return false;
      char *nul = memchr (buf + got, '\0', (size_t) n);
      if (nul != NULL)
        return true;
      got += (size_t) n;
    }
  return false;
}

/* /proc/PID/cwd or /proc/PID/fd/N's target as a path in the process's root, false if not one. */
static bool fd_path (pid_t pid, int dirfd, char *buf, size_t size)
{
  char link[64];
  if (dirfd == AT_FDCWD)
    snprintf (link, sizeof link, "/proc/%d/cwd", (int) pid);
  else
    snprintf (link, sizeof link, "/proc/%d/fd/%d", (int) pid, dirfd);
  ssize_t n = readlink (link, buf, size - 1);
  if (n <= 0 || (size_t) n >= size - 1)
    return false;
  buf[n] = '\0';
  static const char deleted[] = " (deleted)";
  size_t dl = sizeof deleted - 1;
  return buf[0] == '/' && !((size_t) n >= dl && memcmp (buf + n - dl, deleted, dl) == 0);
}

/* An O_PATH fd of what pid's open fd dirfd (or its cwd) is, -1 on failure. */
int open_fd_of (pid_t pid, int dirfd)
{
  char where[64];
  if (dirfd == AT_FDCWD)
    snprintf (where, sizeof where, "/proc/%d/cwd", (int) pid);
  else
    snprintf (where, sizeof where, "/proc/%d/fd/%d", (int) pid, dirfd);
  return open (where, O_PATH | O_CLOEXEC);
}

/* An O_PATH fd of `path` (relative to dirfd) resolved in pid's root as pid would (openat2
 * RESOLVE_IN_ROOT: neither a symlink nor ".." leads outside), -1 on failure. */
int open_target (pid_t pid, int dirfd, const char *path, bool follow)
{
  char full[2 * PATH_MAX + 2];
  char where[64];
  if (path[0] == '/')
    {
      if (strlen (path) >= sizeof full)
        return -1;
      strcpy (full, path);
    }
  else
    {
      if (!fd_path (pid, dirfd, full, PATH_MAX + 1))
        return -1;
      size_t len = strlen (full);
      if (len + 1 + strlen (path) >= sizeof full)
        return -1;
      full[len] = '/';
      strcpy (full + len + 1, path);
    }
  snprintf (where, sizeof where, "/proc/%d/root", (int) pid);
  cleanup_fd int root = open (where, O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root < 0)
    return -1;
  struct open_how how = {
    .flags = O_PATH | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW),
    .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
  };
  return (int) syscall (SYS_openat2, root, full, &how, sizeof how);
}
