/* Layers, the node table and lookup through the upper then the lower layers. */
#define _GNU_SOURCE
#include "overlay.h"
#include "util.h"

#include <fcntl.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

struct ovl ovl;

static int open_layer(const char *path)
{
  int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    die_with_error("cannot open layer directory %s", path);
  return fd;
}

static char *absolute(const char *path)
{
  char *p = realpath(path, NULL);
  if (p == NULL)
    die_with_error("cannot resolve %s", path);
  return p;
}

void layers_init(const char *lowerdirs, const char *upperdir, const char *workdir)
{
  cleanup_free char *lowers = xstrdup(lowerdirs);
  char *save = NULL;
  ovl.layers[0].path = absolute(upperdir);
  ovl.layers[0].fd = open_layer(ovl.layers[0].path);
  ovl.nlayers = 1;
  for (char *tok = strtok_r(lowers, ":", &save); tok != NULL; tok = strtok_r(NULL, ":", &save))
    {
      if (ovl.nlayers == MAX_LAYERS)
        die("too many lower directories (at most %d)", MAX_LAYERS - 1);
      ovl.layers[ovl.nlayers].path = absolute(tok);
      ovl.layers[ovl.nlayers].fd = open_layer(ovl.layers[ovl.nlayers].path);
      ovl.nlayers++;
    }
  if (ovl.nlayers < 2)
    die("lowerdir is empty");
  ovl.workfd = open(workdir, O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (ovl.workfd < 0)
    die_with_error("cannot open workdir %s", workdir);
  ovl.root.name = xstrdup("");
  ovl.root.nlookup = 1;
  ovl.root.keep_fd = -1;
  ovl.gen = 1;
  ovl.table_size = 1024;
  ovl.table = xcalloc(ovl.table_size, sizeof(struct node *));
}

static size_t hash_key(const struct node *parent, const char *name)
{
  size_t h = (size_t) (uintptr_t) parent * 31u;
  for (const unsigned char *p = (const unsigned char *) name; *p; p++)
    h = h * 131u + *p;
  return h;
}

static void table_grow(void)
{
  size_t new_size = ovl.table_size * 2;
  struct node **t = xcalloc(new_size, sizeof(struct node *));
  for (size_t i = 0; i < ovl.table_size; i++)
    {
      struct node *n = ovl.table[i];
      while (n != NULL)
        {
          struct node *next = n->hnext;
          size_t b = hash_key(n->parent, n->name) % new_size;
          n->hnext = t[b];
          t[b] = n;
          n = next;
        }
    }
  free(ovl.table);
  ovl.table = t;
  ovl.table_size = new_size;
}

static void table_remove(struct node *n)
{
  struct node **pp = &ovl.table[hash_key(n->parent, n->name) % ovl.table_size];
  while (*pp != NULL && *pp != n)
    pp = &(*pp)->hnext;
  if (*pp == n)
    {
      *pp = n->hnext;
      ovl.table_count--;
    }
  n->hnext = NULL;
}

static void table_insert(struct node *n)
{
  if (ovl.table_count * 2 > ovl.table_size)
    table_grow();
  size_t b = hash_key(n->parent, n->name) % ovl.table_size;
  n->hnext = ovl.table[b];
  ovl.table[b] = n;
  ovl.table_count++;
}

static struct node *table_find(struct node *parent, const char *name)
{
  for (struct node *n = ovl.table[hash_key(parent, name) % ovl.table_size]; n != NULL; n = n->hnext)
    if (n->parent == parent && strcmp(n->name, name) == 0)
      return n;
  return NULL;
}

struct node *node_of(fuse_ino_t ino)
{
  if (ino == FUSE_ROOT_ID)
    return &ovl.root;
  return (struct node *) (uintptr_t) ino;
}

/* The node for parent/name with one more kernel reference. */
struct node *node_get(struct node *parent, const char *name)
{
  struct node *n = table_find(parent, name);
  if (n == NULL)
    {
      n = xcalloc(1, sizeof(*n));
      n->keep_fd = -1;
      n->parent = parent;
      n->name = xstrdup(name);
      parent->children++;
      table_insert(n);
    }
  n->nlookup++;
  return n;
}

static void node_maybe_free(struct node *n)
{
  while (n != &ovl.root && n->nlookup == 0 && n->children == 0)
    {
      struct node *parent = n->parent;
      if (!n->detached)
        table_remove(n);
      if (n->keep_fd >= 0)
        close(n->keep_fd);
      free(n->name);
      free(n);
      parent->children--;
      n = parent;
    }
}

void node_forget(struct node *n, uint64_t count)
{
  n->nlookup = count > n->nlookup ? 0 : n->nlookup - count;
  node_maybe_free(n);
}

/* The name is gone from the merged tree; open files keep working through their fds. */
void node_detach(struct node *parent, const char *name)
{
  struct node *n = table_find(parent, name);
  if (n == NULL)
    return;
  table_remove(n);
  n->detached = true;
}

/* A name about to be removed or replaced: if the kernel still holds its node, the node keeps what it showed open
 * (O_PATH), so stat of a file still open after its unlink answers from it as on any filesystem (the kernel sends
 * no file handle with the GETATTR of fstat; apt stats the temporary files it unlinked). */
void node_keep_inode(struct node *parent, const char *name, int layer, const char *path)
{
  struct node *n = table_find(parent, name);
  if (n != NULL && n->keep_fd < 0)
    {
      n->keep_fd = openat(ovl.layers[layer].fd, path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
      n->keep_upper = layer == 0;
    }
}

/* Give a node (already out of the table) a new place in the tree. */
static void node_reparent(struct node *n, struct node *newparent, const char *newname)
{
  struct node *oldparent = n->parent;
  free(n->name);
  n->name = xstrdup(newname);
  n->parent = newparent;
  newparent->children++;
  table_insert(n);
  oldparent->children--;
  node_maybe_free(oldparent);
}

void node_move(struct node *oldparent, const char *oldname, struct node *newparent, const char *newname, bool exchange)
{
  struct node *src = table_find(oldparent, oldname);
  struct node *dst = table_find(newparent, newname);
  if (src != NULL && src == dst)
    return;
  if (src != NULL)
    table_remove(src);
  if (dst != NULL)
    {
      table_remove(dst);
      if (!exchange)
        dst->detached = true;
    }
  if (src != NULL)
    node_reparent(src, newparent, newname);
  if (exchange && dst != NULL)
    node_reparent(dst, oldparent, oldname);
}

/* The node's path relative to every layer root ("." for the root), or NULL once it is unlinked: one allocation,
 * filled from the name up to the root. */
char *node_path(struct node *n)
{
  if (n == &ovl.root)
    return xstrdup(".");
  size_t len = 0;
  for (struct node *p = n; p != &ovl.root; p = p->parent)
    {
      if (p->detached)
        return NULL;
      len += strlen(p->name) + 1;
    }
  char *path = xmalloc(len);
  char *end = path + len - 1;
  *end = '\0';
  for (struct node *p = n; p != &ovl.root; p = p->parent)
    {
      size_t l = strlen(p->name);
      end -= l;
      memcpy(end, p->name, l);
      if (end > path)
        *--end = '/';
    }
  return path;
}

char *child_path(struct node *parent, const char *name)
{
  cleanup_free char *p = node_path(parent);
  if (p == NULL)
    return NULL;
  if (strcmp(p, ".") == 0)
    return xstrdup(name);
  return xasprintf("%s/%s", p, name);
}

char *layer_abs(int layer, const char *path)
{
  if (strcmp(path, ".") == 0)
    return xstrdup(ovl.layers[layer].path);
  return xasprintf("%s/%s", ovl.layers[layer].path, path);
}

bool is_whiteout(const struct stat *st)
{
  return S_ISCHR(st->st_mode) && st->st_rdev == makedev(0, 0);
}

bool is_opaque(int layer, const char *path)
{
  cleanup_free char *abs = layer_abs(layer, path);
  char value[2];
  ssize_t n = lgetxattr(abs, OPAQUE_XATTR, value, sizeof(value));
  return n == 1 && value[0] == 'y';
}

/* One path component below a directory merged from the layers in mask. The opaque marker is only read when a
 * lower layer has a directory of the same name, so a directory in a single layer costs one fstatat per layer. */
static int resolve_step(uint64_t mask, const char *path, struct resolved *res)
{
  int last_dir = -1;
  res->layer = -1;
  res->dirmask = 0;
  for (int i = 0; i < ovl.nlayers; i++)
    {
      struct stat st;
      if (!(mask & (UINT64_C(1) << i)))
        continue;
      if (fstatat(ovl.layers[i].fd, path, &st, AT_SYMLINK_NOFOLLOW) < 0)
        {
          if (errno == ENOENT || errno == ENOTDIR)
            continue;
          return -errno;
        }
      if (is_whiteout(&st))
        break;
      if (res->layer < 0)
        {
          res->layer = i;
          res->st = st;
          res->dirmask = UINT64_C(1) << i;
          if (!S_ISDIR(st.st_mode))
            break;
          last_dir = i;
        }
      else
        {
          if (!S_ISDIR(st.st_mode) || is_opaque(last_dir, path))
            break;
          res->dirmask |= UINT64_C(1) << i;
          last_dir = i;
        }
    }
  return res->layer < 0 ? -ENOENT : 0;
}

static uint64_t all_layers(void)
{
  return ovl.nlayers == 64 ? ~UINT64_C(0) : (UINT64_C(1) << ovl.nlayers) - 1;
}

/* Resolve a path from the root, honouring whiteouts and opaque directories on the way. */
int resolve(const char *path, struct resolved *res)
{
  uint64_t mask = all_layers();
  if (strcmp(path, ".") == 0)
    {
      memset(res, 0, sizeof(*res));
      res->dirmask = mask;
      res->layer = 0;
      if (fstatat(ovl.layers[0].fd, ".", &res->st, 0) < 0)
        return -errno;
      return 0;
    }
  /* An upper non-directory is on top whatever the lower layers hold: its upper parents are all directories. */
  if (fstatat(ovl.layers[0].fd, path, &res->st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISDIR(res->st.st_mode)
      && !is_whiteout(&res->st))
    {
      res->layer = 0;
      res->dirmask = 1;
      return 0;
    }
  cleanup_free char *prefix = xstrdup(path);
  for (char *slash = strchr(prefix, '/'); slash != NULL; slash = strchr(slash + 1, '/'))
    {
      struct resolved r;
      *slash = '\0';
      int err = resolve_step(mask, prefix, &r);
      *slash = '/';
      if (err < 0)
        return err;
      if (!S_ISDIR(r.st.st_mode))
        return -ENOTDIR;
      mask = r.dirmask;
    }
  return resolve_step(mask, path, res);
}

/* The next request resolves every name afresh: which layer shows a name, or what a directory merges, changed. */
void layers_changed(void)
{
  ovl.gen++;
}

void node_remember(struct node *n, const struct resolved *res)
{
  n->gen = ovl.gen;
  n->layer = res->layer;
  n->dirmask = res->dirmask;
}

/* parent/name (path is the child's path): one step below the parent's cached merge, so a lookup costs one fstatat
 * per layer the parent merges instead of a walk from the root. */
int resolve_child(struct node *parent, const char *path, struct resolved *res)
{
  if (parent == &ovl.root)
    return resolve_step(all_layers(), path, res);
  if (parent->gen != ovl.gen || parent->detached)
    return resolve(path, res);
  return resolve_step(parent->dirmask, path, res);
}

/* Where a node's path resolves: while nothing changed since it was last resolved, one fstatat in the layer that
 * showed it (lower layers never change; the upper only through this helper); else resolved afresh and cached. */
int resolve_node(struct node *n, const char *path, struct resolved *res)
{
  if (n == &ovl.root)
    return resolve(path, res);
  if (n->gen == ovl.gen && fstatat(ovl.layers[n->layer].fd, path, &res->st, AT_SYMLINK_NOFOLLOW) == 0
      && !is_whiteout(&res->st))
    {
      res->layer = n->layer;
      res->dirmask = n->dirmask;
      return 0;
    }
  int err = resolve_child(n->parent, path, res);
  if (err == 0)
    node_remember(n, res);
  return err;
}

/* Whether a lower layer would show this name if the upper did not cover it (a whiteout is then needed). */
int lower_positive(const char *path)
{
  uint64_t mask = all_layers();
  cleanup_free char *parent = xstrdup(path);
  char *slash = strrchr(parent, '/');
  if (slash != NULL)
    {
      *slash = '\0';
      struct resolved pr;
      int err = resolve(parent, &pr);
      if (err < 0)
        return err;
      mask = pr.dirmask;
    }
  mask &= ~UINT64_C(1);
  struct resolved r;
  int err = resolve_step(mask, path, &r);
  if (err == -ENOENT)
    return 0;
  return err < 0 ? err : 1;
}

/* A whiteout owned as kernel overlay leaves it. Removal makes it in the workdir and renames it into place, so it
 * is 0:0; a rename makes it in the source's directory (RENAME_WHITEOUT), so it takes a setgid directory's group. */
int make_whiteout(const char *path, bool from_rename)
{
  gid_t gid = 0;
  if (from_rename)
    {
      cleanup_free char *parent = xstrdup(path);
      char *slash = strrchr(parent, '/');
      struct stat pst;
      if (slash != NULL)
        *slash = '\0';
      if (fstatat(ovl.layers[0].fd, slash != NULL ? parent : ".", &pst, 0) < 0)
        return -errno;
      if (pst.st_mode & S_ISGID)
        gid = pst.st_gid;
    }
  layers_changed();
  if (mknodat(ovl.layers[0].fd, path, S_IFCHR | 0000, makedev(0, 0)) < 0)
    return -errno;
  if (fchownat(ovl.layers[0].fd, path, 0, gid, AT_SYMLINK_NOFOLLOW) < 0)
    {
      int err = -errno;
      unlinkat(ovl.layers[0].fd, path, 0);
      return err;
    }
  return 0;
}

int set_opaque(const char *path)
{
  cleanup_free char *abs = layer_abs(0, path);
  layers_changed();
  if (lsetxattr(abs, OPAQUE_XATTR, "y", 1, 0) < 0)
    return -errno;
  return 0;
}
