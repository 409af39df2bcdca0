/* Small helpers in the style of bubblewrap: cleanup attributes and a fatal-error printer. */
#ifndef RBUILD_FUSE_UTIL_H
#define RBUILD_FUSE_UTIL_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define UNUSED __attribute__((unused))

void die_with_error(const char *format, ...) __attribute__((format(printf, 1, 2), noreturn));
void die(const char *format, ...) __attribute__((format(printf, 1, 2), noreturn));
void *xmalloc(size_t size);
void *xcalloc(size_t n, size_t size);
char *xstrdup(const char *s);
char *xasprintf(const char *format, ...) __attribute__((format(printf, 1, 2)));

static inline void cleanup_freep(void *p)
{
  void **pp = (void **) p;
  free(*pp);
}

static inline void cleanup_fdp(int *fdp)
{
  if (*fdp >= 0)
    {
      int errsv = errno;
      close(*fdp);
      errno = errsv;
    }
}

#define cleanup_free __attribute__((cleanup(cleanup_freep)))
#define cleanup_fd __attribute__((cleanup(cleanup_fdp)))

#endif
