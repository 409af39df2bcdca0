/* Copy-up: bring a lower entry (and its parent directories) into the upper layer before it changes. */
#define _GNU_SOURCE
#include "overlay.h"
#include "util.h"

#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>

char *work_tmp_name(void)
{
  return xasprintf("#rbuild-copyup-%d-%lu", (int) getpid(), ++ovl.tmp_counter);
}

static int copy_data(int src, int dst, off_t size)
{
  off_t done = 0;
  while (done < size)
    {
      ssize_t n = copy_file_range(src, NULL, dst, NULL, (size_t) (size - done), 0);
      if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL))
        break;
      if (n < 0)
        return -errno;
      if (n == 0)
        return 0;
      done += n;
    }
  char buf[65536];
  for (;;)
    {
      ssize_t n = read(src, buf, sizeof(buf));
      if (n < 0)
        return -errno;
      if (n == 0)
        return 0;
      for (ssize_t off = 0; off < n;)
        {
          ssize_t w = write(dst, buf + off, (size_t) (n - off));
          if (w < 0)
            return -errno;
          off += w;
        }
    }
}

static int copy_file(int layer, const char *path, const struct stat *st, const char *tmp)
{
  cleanup_fd int src = openat(ovl.layers[layer].fd, path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (src < 0)
    return -errno;
  cleanup_fd int dst = openat(ovl.workfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, st->st_mode & 07777);
  if (dst < 0)
    return -errno;
  int err = copy_data(src, dst, st->st_size);
  if (err == 0)
    err = copy_xattrs_fd(src, dst);
  if (err == 0 && fchown(dst, st->st_uid, st->st_gid) < 0)
    err = -errno;
  if (err == 0 && fchmod(dst, st->st_mode & 07777) < 0)
    err = -errno;
  struct timespec times[2] = { st->st_atim, st->st_mtim };
  if (err == 0 && futimens(dst, times) < 0)
    err = -errno;
  return err;
}

static int copy_other(int layer, const char *path, const struct stat *st, const char *tmp)
{
  if (S_ISDIR(st->st_mode))
    {
      if (mkdirat(ovl.workfd, tmp, st->st_mode & 07777) < 0)
        return -errno;
    }
  else if (S_ISLNK(st->st_mode))
    {
      char target[PATH_MAX + 1];
      ssize_t n = readlinkat(ovl.layers[layer].fd, path, target, PATH_MAX);
      if (n < 0)
        return -errno;
      target[n] = '\0';
      if (symlinkat(target, ovl.workfd, tmp) < 0)
        return -errno;
    }
  else if (mknodat(ovl.workfd, tmp, st->st_mode, st->st_rdev) < 0)
    return -errno;
  if (fchownat(ovl.workfd, tmp, st->st_uid, st->st_gid, AT_SYMLINK_NOFOLLOW) < 0)
    return -errno;
  if (!S_ISLNK(st->st_mode) && fchmodat(ovl.workfd, tmp, st->st_mode & 07777, 0) < 0)
    return -errno;
  if (!S_ISLNK(st->st_mode))
    {
      cleanup_fd int src = openat(ovl.layers[layer].fd, path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
      cleanup_free char *srcp = src < 0 ? NULL : xasprintf("/proc/self/fd/%d", src);
      cleanup_fd int dst = openat(ovl.workfd, tmp, O_PATH | O_NOFOLLOW | O_CLOEXEC);
      cleanup_free char *dstp = dst < 0 ? NULL : xasprintf("/proc/self/fd/%d", dst);
      if (srcp == NULL || dstp == NULL)
        return -errno;
      int err = copy_xattrs_path(srcp, dstp);
      if (err < 0)
        return err;
    }
  struct timespec times[2] = { st->st_atim, st->st_mtim };
  if (utimensat(ovl.workfd, tmp, times, AT_SYMLINK_NOFOLLOW) < 0)
    return -errno;
  return 0;
}

/* Make sure path exists in the upper layer, copying it and its parents up from the lower layer that shows it. */
int copy_up(const char *path)
{
  struct resolved res;
  /* Already in the upper layer (whatever it is, it is on top): nothing to copy. */
  if (fstatat(ovl.layers[0].fd, path, &res.st, AT_SYMLINK_NOFOLLOW) == 0 && !is_whiteout(&res.st))
    return 0;
  int err = resolve(path, &res);
  if (err < 0)
    return err;
  if (res.layer == 0)
    return 0;
  const char *slash = strrchr(path, '/');
  if (slash != NULL)
    {
      cleanup_free char *parent = strndup(path, (size_t) (slash - path));
      if (parent == NULL)
        return -ENOMEM;
      err = copy_up(parent);
      if (err < 0)
        return err;
    }
  cleanup_free char *tmp = work_tmp_name();
  layers_changed();
  if (S_ISREG(res.st.st_mode))
    err = copy_file(res.layer, path, &res.st, tmp);
  else
    err = copy_other(res.layer, path, &res.st, tmp);
  if (err == 0 && renameat(ovl.workfd, tmp, ovl.layers[0].fd, path) < 0)
    err = -errno;
  if (err < 0)
    {
      if (unlinkat(ovl.workfd, tmp, S_ISDIR(res.st.st_mode) ? AT_REMOVEDIR : 0) < 0 && errno != ENOENT)
        return err;
    }
  return err;
}
