/* Shared state of rbuild-fuse-overlay: layers, the node table and path resolution. */
#ifndef RBUILD_FUSE_OVERLAY_H
#define RBUILD_FUSE_OVERLAY_H

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>

#define MAX_LAYERS 64
#define OPAQUE_XATTR "user.overlay.opaque"
#define PRIVATE_XATTR_PREFIX "user.overlay."

/* Layer 0 is the upper directory; 1..n are the lower directories, topmost first. */
struct layer
{
  int fd;
  char *path;
};

/* One name in the merged tree. The kernel's node id is the pointer; renames move nodes.
 * layer/dirmask remember where the name resolved while gen equals ovl.gen (see layers_changed). */
struct node
{
  struct node *parent;
  char *name;
  uint64_t nlookup;
  unsigned children;
  bool detached;
  struct node *hnext;
  uint64_t gen;
  int layer;
  uint64_t dirmask;
  int keep_fd; /* once the name is gone: an O_PATH fd of what it showed, for fstat of a file still open */
  bool keep_upper;
};

struct ovl
{
  struct layer layers[MAX_LAYERS];
  int nlayers;
  int workfd;
  struct node root;
  struct node **table;
  size_t table_size;
  size_t table_count;
  unsigned long tmp_counter;
  uint64_t gen; /* bumped by every change to which layer shows a name; nodes' cached resolutions go stale */
  struct fuse_session *se; /* for invalidations the helper sends the kernel */
};

/* Where a path resolves: the topmost layer holding it and, for directories, every layer merged in. */
struct resolved
{
  int layer;
  struct stat st;
  uint64_t dirmask;
};

extern struct ovl ovl;

/* layers.c */
void layers_init(const char *lowerdirs, const char *upperdir, const char *workdir);
struct node *node_of(fuse_ino_t ino);
struct node *node_get(struct node *parent, const char *name);
void node_forget(struct node *n, uint64_t count);
void node_detach(struct node *parent, const char *name);
void node_keep_inode(struct node *parent, const char *name, int layer, const char *path);
void node_move(struct node *oldparent, const char *oldname, struct node *newparent, const char *newname, bool exchange);
char *node_path(struct node *n);
char *child_path(struct node *parent, const char *name);
char *layer_abs(int layer, const char *path);
bool is_whiteout(const struct stat *st);
bool is_opaque(int layer, const char *path);
int resolve(const char *path, struct resolved *res);
int resolve_node(struct node *n, const char *path, struct resolved *res);
int resolve_child(struct node *parent, const char *path, struct resolved *res);
void node_remember(struct node *n, const struct resolved *res);
void layers_changed(void);
int lower_positive(const char *path);
int make_whiteout(const char *path, bool from_rename);
int set_opaque(const char *path);

/* copyup.c */
int copy_up(const char *path);
char *work_tmp_name(void);

/* dir.c */
struct dir_entry
{
  char *name;
  ino_t ino;
  unsigned char type;
};
struct dir_list
{
  struct dir_entry *entries;
  size_t count;
  bool loaded;
};
int dir_list_merged(const char *path, const struct resolved *res, struct dir_list *out);
void dir_list_free(struct dir_list *list);
int dir_is_empty(const char *path, const struct resolved *res);
int dir_clear_upper_whiteouts(const char *path);
void ovl_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void ovl_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void ovl_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void ovl_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);

/* xattr.c */
int copy_xattrs_fd(int src, int dst);
int copy_xattrs_path(const char *src, const char *dst);
void ovl_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags);
void ovl_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size);
void ovl_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
void ovl_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name);

/* ops.c */
double attr_timeout(const struct stat *st);
struct node *entry_of(struct node *parent, const char *name, const struct resolved *res, struct fuse_entry_param *e);
extern const struct fuse_lowlevel_ops ovl_ops;

#endif
