/* Directory listings merged across layers: upper names first, whiteouts and opaque directories hide lower ones. */
#define _GNU_SOURCE
#include "overlay.h"
#include "util.h"

#include <dirent.h>
#include <fcntl.h>
#include <string.h>

struct name_set
{
  char **slots;
  size_t size;
  size_t count;
};

static size_t name_hash(const char *s)
{
  size_t h = 5381;
  for (; *s; s++)
    h = h * 33u + (unsigned char) *s;
  return h;
}

/* Insert name; false when it was already there. */
static bool name_set_add(struct name_set *set, const char *name)
{
  if ((set->count + 1) * 2 > set->size)
    {
      struct name_set bigger = { xcalloc(set->size ? set->size * 2 : 64, sizeof(char *)), set->size ? set->size * 2 : 64, 0 };
      for (size_t i = 0; i < set->size; i++)
        if (set->slots[i] != NULL)
          {
            size_t j = name_hash(set->slots[i]) % bigger.size;
            while (bigger.slots[j] != NULL)
              j = (j + 1) % bigger.size;
            bigger.slots[j] = set->slots[i];
            bigger.count++;
          }
      free(set->slots);
      *set = bigger;
    }
  size_t j = name_hash(name) % set->size;
  while (set->slots[j] != NULL)
    {
      if (strcmp(set->slots[j], name) == 0)
        return false;
      j = (j + 1) % set->size;
    }
  set->slots[j] = xstrdup(name);
  set->count++;
  return true;
}

static void name_set_free(struct name_set *set)
{
  for (size_t i = 0; i < set->size; i++)
    free(set->slots[i]);
  free(set->slots);
}

static void list_add(struct dir_list *list, size_t *cap, const char *name, ino_t ino, unsigned char type)
{
  if (list->count == *cap)
    {
      *cap = *cap ? *cap * 2 : 32;
      list->entries = realloc(list->entries, *cap * sizeof(struct dir_entry));
      if (list->entries == NULL)
        die("out of memory");
    }
  list->entries[list->count].name = xstrdup(name);
  list->entries[list->count].ino = ino;
  list->entries[list->count].type = type;
  list->count++;
}

static void closedirp(DIR **d)
{
  if (*d != NULL)
    closedir(*d);
}

/* Visible names of a merged directory, topmost layer first, without "." and "..". */
int dir_list_merged(const char *path, const struct resolved *res, struct dir_list *out)
{
  struct name_set seen = { NULL, 0, 0 };
  size_t cap = 0;
  int err = 0;
  out->entries = NULL;
  out->count = 0;
  for (int i = 0; i < ovl.nlayers && err == 0; i++)
    {
      if (!(res->dirmask & (UINT64_C(1) << i)))
        continue;
      int fd = openat(ovl.layers[i].fd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (fd < 0)
        {
          err = -errno;
          break;
        }
      __attribute__((cleanup(closedirp))) DIR *d = fdopendir(fd);
      if (d == NULL)
        {
          err = -errno;
          close(fd);
          break;
        }
      struct dirent *de;
      errno = 0;
      while ((de = readdir(d)) != NULL)
        {
          if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
          if (!name_set_add(&seen, de->d_name))
            continue;
          if (de->d_type == DT_CHR || de->d_type == DT_UNKNOWN)
            {
              struct stat st;
              if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && is_whiteout(&st))
                continue;
            }
          list_add(out, &cap, de->d_name, de->d_ino, de->d_type);
        }
      if (errno != 0)
        err = -errno;
    }
  name_set_free(&seen);
  if (err < 0)
    dir_list_free(out);
  return err;
}

void dir_list_free(struct dir_list *list)
{
  for (size_t i = 0; i < list->count; i++)
    free(list->entries[i].name);
  free(list->entries);
  list->entries = NULL;
  list->count = 0;
}

/* 1 when the merged directory shows nothing, 0 when it does, -errno on failure. */
int dir_is_empty(const char *path, const struct resolved *res)
{
  struct dir_list list;
  int err = dir_list_merged(path, res, &list);
  if (err < 0)
    return err;
  int empty = list.count == 0;
  dir_list_free(&list);
  return empty;
}

/* Remove the whiteouts of an upper directory that is empty in the merged view, so it can be removed or replaced. */
int dir_clear_upper_whiteouts(const char *path)
{
  int fd = openat(ovl.layers[0].fd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return errno == ENOENT ? 0 : -errno;
  __attribute__((cleanup(closedirp))) DIR *d = fdopendir(fd);
  if (d == NULL)
    {
      int errsv = errno;
      close(fd);
      return -errsv;
    }
  struct dirent *de;
  while ((de = readdir(d)) != NULL)
    {
      struct stat st;
      if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
        continue;
      if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && is_whiteout(&st)
          && unlinkat(dirfd(d), de->d_name, 0) < 0)
        return -errno;
    }
  return 0;
}

void ovl_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct node *n = node_of(ino);
  cleanup_free char *path = node_path(n);
  struct resolved res;
  if (path == NULL)
    {
      fuse_reply_err(req, ENOENT);
      return;
    }
  int err = resolve_node(n, path, &res);
  if (err == 0 && !S_ISDIR(res.st.st_mode))
    err = -ENOTDIR;
  if (err < 0)
    {
      fuse_reply_err(req, -err);
      return;
    }
  /* Listed at the first readdir: when the kernel answers from its cached listing, none comes. */
  struct dir_list *list = xcalloc(1, sizeof(*list));
  fi->fh = (uint64_t) (uintptr_t) list;
  /* The kernel may keep the listing: it drops it itself when an operation through the mount changes the
   * directory, and nothing else does (see TIMEOUT in ops.c). */
  fi->cache_readdir = 1;
  fi->keep_cache = 1;
  if (fuse_reply_open(req, fi) != 0)
    {
      dir_list_free(list);
      free(list);
    }
}

/* One entry of a readdirplus reply: the name looked up (a node counted for it, as a lookup would) so the kernel
 * needs no lookup per name after the listing. An entry that no longer resolves is listed without attributes. */
static size_t add_plus(fuse_req_t req, char *buf, size_t room, struct node *dir, const char *dirpath,
                       const struct dir_entry *de, off_t next)
{
  struct fuse_entry_param e = { 0 };
  struct resolved res;
  struct node *n = NULL;
  cleanup_free char *path = NULL;
  if (dirpath != NULL)
    path = strcmp(dirpath, ".") == 0 ? xstrdup(de->name) : xasprintf("%s/%s", dirpath, de->name);
  if (path != NULL && resolve_child(dir, path, &res) == 0)
    n = entry_of(dir, de->name, &res, &e);
  else
    {
      e.attr.st_ino = de->ino;
      e.attr.st_mode = (mode_t) DTTOIF(de->type);
    }
  size_t used = fuse_add_direntry_plus(req, buf, room, de->name, &e, next);
  if (used > room && n != NULL)
    node_forget(n, 1);
  return used;
}

/* The merged names of an open directory, read at its first readdir; a directory removed since lists nothing. */
static int load_list(struct node *dir, struct dir_list *list)
{
  cleanup_free char *path = node_path(dir);
  struct resolved res;
  list->loaded = true;
  if (path == NULL)
    return 0;
  int err = resolve_node(dir, path, &res);
  if (err == 0 && !S_ISDIR(res.st.st_mode))
    err = -ENOTDIR;
  return err < 0 ? err : dir_list_merged(path, &res, list);
}

/* Offsets 0 and 1 are "." and ".."; entry i is offset i + 2. */
static void reply_dir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi, bool plus)
{
  struct dir_list *list = (struct dir_list *) (uintptr_t) fi->fh;
  struct node *dir = node_of(ino);
  if (!list->loaded)
    {
      int err = load_list(dir, list);
      if (err < 0)
        {
          fuse_reply_err(req, -err);
          return;
        }
    }
  cleanup_free char *dirpath = plus ? node_path(dir) : NULL;
  cleanup_free char *buf = xcalloc(1, size);
  size_t used = 0;
  for (size_t i = (size_t) off; i < list->count + 2; i++)
    {
      size_t n;
      if (i < 2)
        {
          const char *name = i == 0 ? "." : "..";
          struct fuse_entry_param e = { .attr.st_mode = S_IFDIR };
          struct stat st = { .st_mode = S_IFDIR };
          n = plus ? fuse_add_direntry_plus(req, buf + used, size - used, name, &e, (off_t) (i + 1))
                   : fuse_add_direntry(req, buf + used, size - used, name, &st, (off_t) (i + 1));
        }
      else if (plus)
        n = add_plus(req, buf + used, size - used, dir, dirpath, &list->entries[i - 2], (off_t) (i + 1));
      else
        {
          struct stat st = { .st_ino = list->entries[i - 2].ino,
                             .st_mode = (mode_t) DTTOIF(list->entries[i - 2].type) };
          n = fuse_add_direntry(req, buf + used, size - used, list->entries[i - 2].name, &st, (off_t) (i + 1));
        }
      if (n > size - used)
        break;
      used += n;
    }
  fuse_reply_buf(req, buf, used);
}

void ovl_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
  reply_dir(req, ino, size, off, fi, false);
}

void ovl_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
  reply_dir(req, ino, size, off, fi, true);
}

void ovl_releasedir(fuse_req_t req, UNUSED fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct dir_list *list = (struct dir_list *) (uintptr_t) fi->fh;
  dir_list_free(list);
  free(list);
  fuse_reply_err(req, 0);
}
