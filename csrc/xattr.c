/* Extended attributes: passed through to the topmost layer, overlay-private ones (user.overlay.*) hidden. */
#define _GNU_SOURCE
#include "overlay.h"
#include "util.h"

#include <string.h>
#include <sys/xattr.h>

static bool is_private(const char *name)
{
  return strncmp(name, PRIVATE_XATTR_PREFIX, strlen(PRIVATE_XATTR_PREFIX)) == 0;
}

static bool ignorable(int err)
{
  return err == EOPNOTSUPP || err == EPERM;
}

/* Copy the visible xattrs of one open file to another (copy-up); private ones are the overlay's own. */
int copy_xattrs_fd(int src, int dst)
{
  ssize_t len = flistxattr(src, NULL, 0);
  if (len < 0)
    return ignorable(errno) ? 0 : -errno;
  cleanup_free char *names = xmalloc((size_t) len + 1);
  len = flistxattr(src, names, (size_t) len);
  if (len < 0)
    return -errno;
  for (char *name = names; name < names + len; name += strlen(name) + 1)
    {
      if (is_private(name))
        continue;
      ssize_t vlen = fgetxattr(src, name, NULL, 0);
      if (vlen < 0)
        return -errno;
      cleanup_free char *value = xmalloc((size_t) vlen);
      vlen = fgetxattr(src, name, value, (size_t) vlen);
      if (vlen < 0)
        return -errno;
      if (fsetxattr(dst, name, value, (size_t) vlen, 0) < 0 && !ignorable(errno))
        return -errno;
    }
  return 0;
}

int copy_xattrs_path(const char *src, const char *dst)
{
  ssize_t len = listxattr(src, NULL, 0);
  if (len < 0)
    return ignorable(errno) ? 0 : -errno;
  cleanup_free char *names = xmalloc((size_t) len + 1);
  len = listxattr(src, names, (size_t) len);
  if (len < 0)
    return -errno;
  for (char *name = names; name < names + len; name += strlen(name) + 1)
    {
      if (is_private(name))
        continue;
      ssize_t vlen = getxattr(src, name, NULL, 0);
      if (vlen < 0)
        return -errno;
      cleanup_free char *value = xmalloc((size_t) vlen);
      vlen = getxattr(src, name, value, (size_t) vlen);
      if (vlen < 0)
        return -errno;
      if (setxattr(dst, name, value, (size_t) vlen, 0) < 0 && !ignorable(errno))
        return -errno;
    }
  return 0;
}

/* Absolute path of the entry in the layer that shows it; copied up first when asked. */
static int locate(fuse_ino_t ino, bool for_write, char **abs)
{
  struct node *n = node_of(ino);
  cleanup_free char *path = node_path(n);
  if (path == NULL)
    return -ENOENT;
  struct resolved res;
  int err = for_write ? copy_up(path) : 0;
  if (err < 0)
    return err;
  err = resolve_node(n, path, &res);
  if (err < 0)
    return err;
  *abs = layer_abs(res.layer, path);
  return 0;
}

void ovl_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags)
{
  cleanup_free char *abs = NULL;
  if (is_private(name))
    {
      fuse_reply_err(req, EOPNOTSUPP);
      return;
    }
  int err = locate(ino, true, &abs);
  if (err == 0 && lsetxattr(abs, name, value, size, flags) < 0)
    err = -errno;
  fuse_reply_err(req, -err);
}

void ovl_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
  cleanup_free char *abs = NULL;
  cleanup_free char *value = NULL;
  if (is_private(name))
    {
      fuse_reply_err(req, EOPNOTSUPP);
      return;
    }
  int err = locate(ino, false, &abs);
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  if (size > 0)
    value = xmalloc(size);
  ssize_t n = lgetxattr(abs, name, value, size);
  if (n < 0)
    fuse_reply_err(req, errno);
  else if (size == 0)
    fuse_reply_xattr(req, (size_t) n);
  else
    fuse_reply_buf(req, value, (size_t) n);
}

void ovl_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
  cleanup_free char *abs = NULL;
  int err = locate(ino, false, &abs);
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  ssize_t len = llistxattr(abs, NULL, 0);
  if (len < 0)
    {
      fuse_reply_err(req, errno);
      return;
    }
  cleanup_free char *names = xmalloc((size_t) len + 1);
  len = llistxattr(abs, names, (size_t) len);
  if (len < 0)
    {
      fuse_reply_err(req, errno);
      return;
    }
  cleanup_free char *visible = xmalloc((size_t) len + 1);
  size_t vlen = 0;
  for (char *name = names; name < names + len; name += strlen(name) + 1)
    {
      size_t l = strlen(name) + 1;
      if (is_private(name))
        continue;
      memcpy(visible + vlen, name, l);
      vlen += l;
    }
  if (size == 0)
    fuse_reply_xattr(req, vlen);
  else if (size < vlen)
    fuse_reply_err(req, ERANGE);
  else
    fuse_reply_buf(req, visible, vlen);
}

void ovl_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
  cleanup_free char *abs = NULL;
  if (is_private(name))
    {
      fuse_reply_err(req, EOPNOTSUPP);
      return;
    }
  int err = locate(ino, true, &abs);
  if (err == 0 && lremovexattr(abs, name) < 0)
    err = -errno;
  fuse_reply_err(req, -err);
}
