/* The FUSE low-level operations: names through the layers, changes in the upper layer only. */
#define _GNU_SOURCE
#include "overlay.h"
#include "util.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

/* Nothing but this helper changes what the mount shows while it is mounted: lower layers never change, and the
 * upper only through these operations (rbuild's COPY writes new names straight into the upper at the end of a
 * step, and asks the mount nothing about them afterwards). The kernel drops what it cached of a directory when an
 * operation through this mount changes it, so names (also absent ones) and attributes can be cached this long. */
#define TIMEOUT 86400.0

/* Hard links are separate nodes (one per name), so the attributes of a non-directory with several names are
 * never cached: a write through another name must show at once. One with a single name changes only through its
 * own kernel inode, whose cache the kernel keeps up to date, or gets a second name (ovl_link invalidates it). */
double attr_timeout(const struct stat *st)
{
  return S_ISDIR(st->st_mode) || st->st_nlink == 1 ? TIMEOUT : 0.0;
}

/* The entry for parent/name, resolved at path, with one more lookup counted on its node. */
struct node *entry_of(struct node *parent, const char *name, const struct resolved *res, struct fuse_entry_param *e)
{
  struct node *n = node_get(parent, name);
  node_remember(n, res);
  memset(e, 0, sizeof(*e));
  e->ino = (fuse_ino_t) (uintptr_t) n;
  e->attr = res->st;
  e->attr_timeout = attr_timeout(&res->st);
  e->entry_timeout = TIMEOUT;
  return n;
}

/* lookup: an absent name is answered as a negative entry, which the kernel keeps until an operation through this
 * mount makes the name. */
static void reply_entry(fuse_req_t req, struct node *parent, const char *name, const char *path, bool lookup)
{
  struct resolved res;
  int err = resolve_child(parent, path, &res);
  if (err == -ENOENT && lookup)
    {
      struct fuse_entry_param neg = { .ino = 0, .entry_timeout = TIMEOUT };
      fuse_reply_entry(req, &neg);
      return;
    }
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  struct fuse_entry_param e;
  struct node *n = entry_of(parent, name, &res, &e);
  if (fuse_reply_entry(req, &e) != 0)
    node_forget(n, 1);
}

static void ovl_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
  struct node *p = node_of(parent);
  cleanup_free char *path = child_path(p, name);
  if (path == NULL)
    {
      fuse_reply_err(req, ENOENT);
      return;
    }
  reply_entry(req, p, name, path, true);
}

static void ovl_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
  node_forget(node_of(ino), nlookup);
  fuse_reply_none(req);
}

static void ovl_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
  for (size_t i = 0; i < count; i++)
    node_forget(node_of(forgets[i].ino), forgets[i].nlookup);
  fuse_reply_none(req);
}

static void ovl_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct node *n = node_of(ino);
  cleanup_free char *path = node_path(n);
  struct stat st;
  if (path == NULL)
    {
      int fd = fi != NULL ? (int) fi->fh : n->keep_fd;
      if (fd < 0 || fstat(fd, &st) < 0)
        {
          fuse_reply_err(req, fd < 0 ? ENOENT : errno);
          return;
        }
      fuse_reply_attr(req, &st, attr_timeout(&st));
      return;
    }
  struct resolved res;
  int err = resolve_node(n, path, &res);
  if (err < 0)
    fuse_reply_err(req, -err);
  else
    fuse_reply_attr(req, &res.st, attr_timeout(&res.st));
}

static int apply_setattr(const char *path, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
  int upper = ovl.layers[0].fd;
  int fd = fi != NULL ? (int) fi->fh : -1;
  if (to_set & FUSE_SET_ATTR_MODE)
    {
      if ((fd >= 0 ? fchmod(fd, attr->st_mode & 07777) : fchmodat(upper, path, attr->st_mode & 07777, 0)) < 0)
        return -errno;
    }
  if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))
    {
      uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t) -1;
      gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t) -1;
      if ((fd >= 0 ? fchown(fd, uid, gid) : fchownat(upper, path, uid, gid, AT_SYMLINK_NOFOLLOW)) < 0)
        return -errno;
    }
  if (to_set & FUSE_SET_ATTR_SIZE)
    {
      if (fd >= 0)
        {
          if (ftruncate(fd, attr->st_size) < 0)
            return -errno;
        }
      else
        {
          cleanup_fd int wfd = openat(upper, path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
          if (wfd < 0 || ftruncate(wfd, attr->st_size) < 0)
            return -errno;
        }
    }
  if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME))
    {
      struct timespec ts[2] = { { 0, UTIME_OMIT }, { 0, UTIME_OMIT } };
      if (to_set & FUSE_SET_ATTR_ATIME_NOW)
        ts[0].tv_nsec = UTIME_NOW;
      else if (to_set & FUSE_SET_ATTR_ATIME)
        ts[0] = attr->st_atim;
      if (to_set & FUSE_SET_ATTR_MTIME_NOW)
        ts[1].tv_nsec = UTIME_NOW;
      else if (to_set & FUSE_SET_ATTR_MTIME)
        ts[1] = attr->st_mtim;
      if ((fd >= 0 ? futimens(fd, ts) : utimensat(upper, path, ts, AT_SYMLINK_NOFOLLOW)) < 0)
        return -errno;
    }
  return 0;
}

static void ovl_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
  cleanup_free char *path = node_path(node_of(ino));
  int err = 0;
  if (path == NULL && fi == NULL)
    err = -ENOENT;
  if (err == 0 && path != NULL)
    err = copy_up(path);
  if (err == 0)
    err = apply_setattr(path, attr, to_set, fi);
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  ovl_getattr(req, ino, fi);
}

static void ovl_readlink(fuse_req_t req, fuse_ino_t ino)
{
  struct node *n = node_of(ino);
  cleanup_free char *path = node_path(n);
  struct resolved res;
  char target[PATH_MAX + 1];
  int err = path == NULL ? -ENOENT : resolve_node(n, path, &res);
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  ssize_t len = readlinkat(ovl.layers[res.layer].fd, path, target, PATH_MAX);
  if (len < 0)
    {
      fuse_reply_err(req, errno);
      return;
    }
  target[len] = '\0';
  fuse_reply_readlink(req, target);
}

/* A directory is "merge" when lower layers show through it. */
static bool is_merge_dir(const char *path)
{
  struct resolved res;
  return resolve(path, &res) == 0 && S_ISDIR(res.st.st_mode) && (res.dirmask & ~UINT64_C(1)) != 0
         && (res.dirmask & 1);
}

/* Get the upper layer ready for a new name: the parent copied up, a whiteout in the way removed. */
static int prepare_create(struct node *parent, const char *path, bool *had_whiteout)
{
  cleanup_free char *ppath = node_path(parent);
  struct stat st;
  *had_whiteout = false;
  if (ppath == NULL)
    return -ENOENT;
  int err = copy_up(ppath);
  if (err < 0)
    return err;
  if (fstatat(ovl.layers[0].fd, path, &st, AT_SYMLINK_NOFOLLOW) == 0 && is_whiteout(&st))
    {
      layers_changed();
      if (unlinkat(ovl.layers[0].fd, path, 0) < 0)
        return -errno;
      *had_whiteout = true;
    }
  return 0;
}

/* Give a new upper entry the caller's ownership (group from a setgid parent) and cover lower directories. */
static int finish_create(fuse_req_t req, const char *path, bool is_dir, bool had_whiteout)
{
  const struct fuse_ctx *ctx = fuse_req_ctx(req);
  gid_t gid = ctx->gid;
  cleanup_free char *ppath = xstrdup(path);
  char *slash = strrchr(ppath, '/');
  struct stat pst;
  if (slash != NULL)
    *slash = '\0';
  else
    strcpy(ppath, ".");
  if (fstatat(ovl.layers[0].fd, ppath, &pst, 0) == 0 && (pst.st_mode & S_ISGID))
    gid = pst.st_gid;
  if (fchownat(ovl.layers[0].fd, path, ctx->uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
    return -errno;
  /* A new directory where a whiteout was must not show the lower directory it replaces. */
  if (is_dir && had_whiteout)
    return set_opaque(path);
  return 0;
}

static void create_node(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev,
                        const char *link)
{
  struct node *p = node_of(parent);
  cleanup_free char *path = child_path(p, name);
  bool had_whiteout = false;
  int err = path == NULL ? -ENOENT : prepare_create(p, path, &had_whiteout);
  if (err == 0)
    {
      int upper = ovl.layers[0].fd;
      int rc;
      if (link != NULL)
        rc = symlinkat(link, upper, path);
      else if (S_ISDIR(mode))
        rc = mkdirat(upper, path, mode & 07777);
      else
        rc = mknodat(upper, path, mode, rdev);
      err = rc < 0 ? -errno : finish_create(req, path, S_ISDIR(mode), had_whiteout);
    }
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  reply_entry(req, p, name, path, false);
}

static void ovl_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
  create_node(req, parent, name, mode, rdev, NULL);
}

static void ovl_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
  create_node(req, parent, name, S_IFDIR | mode, 0, NULL);
}

static void ovl_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
  create_node(req, parent, name, S_IFLNK | 0777, 0, link);
}

static void ovl_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
  struct node *p = node_of(newparent);
  cleanup_free char *src = node_path(node_of(ino));
  cleanup_free char *path = child_path(p, newname);
  bool had_whiteout;
  int err = src == NULL || path == NULL ? -ENOENT : copy_up(src);
  if (err == 0)
    err = prepare_create(p, path, &had_whiteout);
  if (err == 0 && linkat(ovl.layers[0].fd, src, ovl.layers[0].fd, path, 0) < 0)
    err = -errno;
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  /* The source's cached link count is stale now (attributes only: no lock of the link is needed for that). */
  fuse_lowlevel_notify_inval_inode(ovl.se, ino, -1, 0);
  reply_entry(req, p, newname, path, false);
}

/* Remove a name: from the upper layer if it is there, then a whiteout if a lower layer still shows it. */
static int remove_name(struct node *parent, const char *name, bool dir)
{
  cleanup_free char *path = child_path(parent, name);
  struct resolved res;
  int err = path == NULL ? -ENOENT : resolve(path, &res);
  if (err < 0)
    return err;
  if (dir && !S_ISDIR(res.st.st_mode))
    return -ENOTDIR;
  if (!dir && S_ISDIR(res.st.st_mode))
    return -EISDIR;
  if (dir)
    {
      int empty = dir_is_empty(path, &res);
      if (empty < 0)
        return empty;
      if (!empty)
        return -ENOTEMPTY;
    }
  int positive = lower_positive(path);
  if (positive < 0)
    return positive;
  node_keep_inode(parent, name, res.layer, path);
  if (res.layer == 0)
    {
      if (dir && (err = dir_clear_upper_whiteouts(path)) < 0)
        return err;
      if (unlinkat(ovl.layers[0].fd, path, dir ? AT_REMOVEDIR : 0) < 0)
        return -errno;
    }
  else
    {
      cleanup_free char *ppath = node_path(parent);
      if ((err = copy_up(ppath)) < 0)
        return err;
    }
  if (positive && (err = make_whiteout(path, false)) < 0)
    return err;
  node_detach(parent, name);
  return 0;
}

static void ovl_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
  int err = remove_name(node_of(parent), name, false);
  layers_changed();
  fuse_reply_err(req, -err);
}

static void ovl_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
  int err = remove_name(node_of(parent), name, true);
  layers_changed();
  fuse_reply_err(req, -err);
}

static int do_rename(struct node *op, const char *name, struct node *np, const char *newname, unsigned int flags)
{
  cleanup_free char *opath = node_path(op);
  cleanup_free char *npath = node_path(np);
  cleanup_free char *src = child_path(op, name);
  cleanup_free char *dst = child_path(np, newname);
  struct resolved sres, dres;
  bool exchange = flags & RENAME_EXCHANGE;
  if (flags & ~(unsigned) (RENAME_NOREPLACE | RENAME_EXCHANGE))
    return -EINVAL;
  if (opath == NULL || npath == NULL || src == NULL || dst == NULL)
    return -ENOENT;
  int err = resolve(src, &sres);
  if (err < 0)
    return err;
  err = resolve(dst, &dres);
  if (err < 0 && err != -ENOENT)
    return err;
  bool dst_exists = err == 0;
  if (strcmp(src, dst) == 0)
    return 0;
  if ((flags & RENAME_NOREPLACE) && dst_exists)
    return -EEXIST;
  if (exchange && !dst_exists)
    return -ENOENT;
  bool src_dir = S_ISDIR(sres.st.st_mode);
  bool dst_dir = dst_exists && S_ISDIR(dres.st.st_mode);
  /* Like kernel overlay without redirect_dir: a directory that lower layers show cannot move. */
  if (src_dir && (sres.layer != 0 || (sres.dirmask & ~UINT64_C(1))))
    return -EXDEV;
  if (exchange && dst_dir && (dres.layer != 0 || (dres.dirmask & ~UINT64_C(1))))
    return -EXDEV;
  if (!exchange && dst_exists)
    {
      if (dst_dir && !src_dir)
        return -EISDIR;
      if (!dst_dir && src_dir)
        return -ENOTDIR;
      /* A directory only in the upper layer: its own rename reports ENOTEMPTY (after the opaque marking below,
       * as kernel overlay does). */
      if (dst_dir && (dres.dirmask & ~UINT64_C(1)))
        {
          int empty = dir_is_empty(dst, &dres);
          if (empty < 0)
            return empty;
          if (!empty)
            return -ENOTEMPTY;
        }
    }
  int src_positive = lower_positive(src);
  if (src_positive < 0)
    return src_positive;
  bool src_opaque = src_dir && is_opaque(0, src);
  bool dst_opaque = dst_dir && is_opaque(0, dst);
  if ((err = copy_up(src)) < 0 || (err = copy_up(npath)) < 0)
    return err;
  if (exchange && (err = copy_up(dst)) < 0)
    return err;
  int upper = ovl.layers[0].fd;
  struct stat sst, dst_st;
  /* Two names of one file: POSIX rename does nothing. */
  if (dst_exists && fstatat(upper, src, &sst, AT_SYMLINK_NOFOLLOW) == 0
      && fstatat(upper, dst, &dst_st, AT_SYMLINK_NOFOLLOW) == 0 && sst.st_dev == dst_st.st_dev
      && sst.st_ino == dst_st.st_ino)
    return 0;
  if (!exchange)
    {
      struct stat st;
      if (fstatat(upper, dst, &st, AT_SYMLINK_NOFOLLOW) == 0)
        {
          if (is_whiteout(&st))
            {
              if (unlinkat(upper, dst, 0) < 0)
                return -errno;
            }
          else if (S_ISDIR(st.st_mode) && (err = dir_clear_upper_whiteouts(dst)) < 0)
            return err;
        }
    }
  /* A directory moving into a merged one becomes opaque, so nothing lower shows through at its new name. */
  if (src_dir && !src_opaque && is_merge_dir(npath) && (err = set_opaque(src)) < 0)
    return err;
  if (exchange && dst_dir && !dst_opaque && is_merge_dir(opath) && (err = set_opaque(dst)) < 0)
    return err;
  if (!exchange && dst_exists)
    node_keep_inode(np, newname, dres.layer, dst);
  if (renameat2(upper, src, upper, dst, exchange ? RENAME_EXCHANGE : 0) < 0)
    return -errno;
  if (!exchange && src_positive && (err = make_whiteout(src, true)) < 0)
    return err;
  node_move(op, name, np, newname, exchange);
  return 0;
}

static void ovl_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                       const char *newname, unsigned int flags)
{
  int err = do_rename(node_of(parent), name, node_of(newparent), newname, flags);
  layers_changed();
  fuse_reply_err(req, -err);
}

static int open_flags(int flags)
{
  return (flags & ~(O_CREAT | O_EXCL | O_NOCTTY)) | O_CLOEXEC | O_NOFOLLOW;
}

/* Open a file whose name is gone (through /proc/PID/fd/N): what the node kept, for writing only if upper. */
static void open_removed(fuse_req_t req, struct node *n, bool for_write, struct fuse_file_info *fi)
{
  if (n->keep_fd < 0 || (for_write && !n->keep_upper))
    {
      fuse_reply_err(req, n->keep_fd < 0 ? ENOENT : EROFS);
      return;
    }
  char proc[64];
  snprintf(proc, sizeof(proc), "/proc/self/fd/%d", n->keep_fd);
  int fd = open(proc, open_flags(fi->flags) & ~O_NOFOLLOW);
  if (fd < 0)
    {
      fuse_reply_err(req, errno);
      return;
    }
  fi->fh = (uint64_t) fd;
  if (fuse_reply_open(req, fi) != 0)
    close(fd);
}

static void ovl_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct node *n = node_of(ino);
  cleanup_free char *path = node_path(n);
  struct resolved res;
  bool for_write = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
  if (path == NULL)
    {
      open_removed(req, n, for_write, fi);
      return;
    }
  int err = for_write ? copy_up(path) : 0;
  if (err == 0)
    err = resolve_node(n, path, &res);
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  int fd = openat(ovl.layers[res.layer].fd, path, open_flags(fi->flags));
  if (fd < 0)
    {
      fuse_reply_err(req, errno);
      return;
    }
  fi->fh = (uint64_t) fd;
  /* Keep what the kernel cached of the file from one open to the next where nothing but this inode can change it:
   * a lower layer never changes (a copy-up copies the same bytes), and an upper file with one name changes only
   * through this mount and this name. A hard link is a kernel inode per name, so its cache is dropped at open. */
  fi->keep_cache = res.layer != 0 || res.st.st_nlink == 1;
  if (fuse_reply_open(req, fi) != 0)
    close(fd);
}

static void ovl_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
  struct node *p = node_of(parent);
  cleanup_free char *path = child_path(p, name);
  bool had_whiteout;
  int err = path == NULL ? -ENOENT : prepare_create(p, path, &had_whiteout);
  cleanup_fd int fd = -1;
  if (err == 0)
    {
      fd = openat(ovl.layers[0].fd, path, open_flags(fi->flags) | O_CREAT, mode & 07777);
      err = fd < 0 ? -errno : finish_create(req, path, false, false);
    }
  struct resolved res;
  if (err == 0)
    err = resolve_child(p, path, &res);
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  struct fuse_entry_param e;
  struct node *n = entry_of(p, name, &res, &e);
  fi->fh = (uint64_t) fd;
  if (fuse_reply_create(req, &e, fi) != 0)
    node_forget(n, 1);
  else
    fd = -1;
}

static void ovl_read(fuse_req_t req, UNUSED fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
  struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
  buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
  buf.buf[0].fd = (int) fi->fh;
  buf.buf[0].pos = off;
  fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

static void ovl_write_buf(fuse_req_t req, UNUSED fuse_ino_t ino, struct fuse_bufvec *in, off_t off,
                          struct fuse_file_info *fi)
{
  struct fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
  out.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
  out.buf[0].fd = (int) fi->fh;
  out.buf[0].pos = off;
  ssize_t n = fuse_buf_copy(&out, in, 0);
  if (n < 0)
    fuse_reply_err(req, (int) -n);
  else
    fuse_reply_write(req, (size_t) n);
}

static void ovl_release(fuse_req_t req, UNUSED fuse_ino_t ino, struct fuse_file_info *fi)
{
  close((int) fi->fh);
  fuse_reply_err(req, 0);
}

static void ovl_fsync(fuse_req_t req, UNUSED fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
  int rc = datasync ? fdatasync((int) fi->fh) : fsync((int) fi->fh);
  fuse_reply_err(req, rc < 0 ? errno : 0);
}

static void ovl_fallocate(fuse_req_t req, UNUSED fuse_ino_t ino, int mode, off_t offset, off_t length,
                          struct fuse_file_info *fi)
{
  fuse_reply_err(req, fallocate((int) fi->fh, mode, offset, length) < 0 ? errno : 0);
}

static void ovl_statfs(fuse_req_t req, UNUSED fuse_ino_t ino)
{
  struct statvfs sv;
  if (fstatvfs(ovl.layers[0].fd, &sv) < 0)
    fuse_reply_err(req, errno);
  else
    fuse_reply_statfs(req, &sv);
}

/* Move file data between the layer files and /dev/fuse with splice where the kernel can (no copy through the
 * helper's memory). */
static void ovl_init(UNUSED void *userdata, struct fuse_conn_info *conn)
{
  conn->want |= conn->capable & (FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
}

/* No flush: nothing is buffered here, and without the operation the kernel stops sending one per close. */
const struct fuse_lowlevel_ops ovl_ops = {
  .init = ovl_init,
  .lookup = ovl_lookup,
  .forget = ovl_forget,
  .forget_multi = ovl_forget_multi,
  .getattr = ovl_getattr,
  .setattr = ovl_setattr,
  .readlink = ovl_readlink,
  .mknod = ovl_mknod,
  .mkdir = ovl_mkdir,
  .symlink = ovl_symlink,
  .link = ovl_link,
  .unlink = ovl_unlink,
  .rmdir = ovl_rmdir,
  .rename = ovl_rename,
  .open = ovl_open,
  .create = ovl_create,
  .read = ovl_read,
  .write_buf = ovl_write_buf,
  .release = ovl_release,
  .fsync = ovl_fsync,
  .opendir = ovl_opendir,
  .readdir = ovl_readdir,
  .readdirplus = ovl_readdirplus,
  .releasedir = ovl_releasedir,
  .statfs = ovl_statfs,
  .fallocate = ovl_fallocate,
  .setxattr = ovl_setxattr,
  .getxattr = ovl_getxattr,
  .listxattr = ovl_listxattr,
  .removexattr = ovl_removexattr,
};
