/* Fatal errors and allocation that cannot fail quietly. */
#define _GNU_SOURCE
#include "util.h"

#include <stdarg.h>
#include <string.h>

static void vwarn_prefixed(const char *format, va_list args)
{
  fprintf(stderr, "%s: ", program_invocation_short_name);
  vfprintf(stderr, format, args);
}

void die_with_error(const char *format, ...)
{
  int errsv = errno;
  va_list args;
  va_start(args, format);
  vwarn_prefixed(format, args);
  va_end(args);
  fprintf(stderr, ": %s\n", strerror(errsv));
  exit(1);
}

void die(const char *format, ...)
{
  va_list args;
  va_start(args, format);
  vwarn_prefixed(format, args);
  va_end(args);
  fputc('\n', stderr);
  exit(1);
}

void *xmalloc(size_t size)
{
  void *p = malloc(size ? size : 1);
  if (p == NULL)
    die("out of memory");
  return p;
}

void *xcalloc(size_t n, size_t size)
{
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (p == NULL)
    die("out of memory");
  return p;
}

char *xstrdup(const char *s)
{
  char *p = strdup(s);
  if (p == NULL)
    die("out of memory");
  return p;
}

char *xasprintf(const char *format, ...)
{
  char *p = NULL;
  va_list args;
  va_start(args, format);
  if (vasprintf(&p, format, args) < 0)
    die("out of memory");
  va_end(args);
  return p;
}
