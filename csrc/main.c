/* rbuild-fuse-overlay: an overlay filesystem in FUSE for where kernel overlayfs refuses a user namespace.
 *
 *   rbuild-fuse-overlay [--ready-fd N] -o lowerdir=A:B,upperdir=U,workdir=W[,fuse options] MOUNTPOINT
 *
 * Runs in the foreground until the mount goes away (fusermount3 -u, umount, SIGTERM/SIGINT or the
 * parent's death). Once mounted it writes one byte to the ready fd and closes it.
 * Exit status: 0 after a clean unmount, 1 when mounting or serving fails, 2 on bad usage. */
#define _GNU_SOURCE
#include "overlay.h"
#include "util.h"

#include <limits.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>

static void usage(void)
{
  fputs("usage: rbuild-fuse-overlay [--ready-fd N] -o lowerdir=A[:B...],upperdir=U,workdir=W[,opt...] MOUNTPOINT\n",
        stderr);
  exit(2);
}

static int parse_fd(const char *s)
{
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno != 0 || *end != '\0' || end == s || v < 0 || v > INT_MAX)
    usage();
  return (int) v;
}

/* Append "key=value" or a plain flag to a comma list. */
static void append_opt(char **list, const char *opt)
{
  char *joined = *list == NULL ? xstrdup(opt) : xasprintf("%s,%s", *list, opt);
  free(*list);
  *list = joined;
}

int main(int argc, char **argv)
{
  const char *mountpoint = NULL;
  cleanup_free char *lower = NULL;
  cleanup_free char *upper = NULL;
  cleanup_free char *work = NULL;
  cleanup_free char *fuse_opts = xstrdup("default_permissions,fsname=rbuild-fuse-overlay,subtype=rbuild-overlay");
  int ready_fd = -1;
  pid_t parent = getppid();

  for (int i = 1; i < argc; i++)
    {
      if (strcmp(argv[i], "--ready-fd") == 0 && i + 1 < argc)
        ready_fd = parse_fd(argv[++i]);
      else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc)
        {
          cleanup_free char *opts = xstrdup(argv[++i]);
          char *save = NULL;
          for (char *o = strtok_r(opts, ",", &save); o != NULL; o = strtok_r(NULL, ",", &save))
            {
              if (strncmp(o, "lowerdir=", 9) == 0)
                {
                  free(lower);
                  lower = xstrdup(o + 9);
                }
              else if (strncmp(o, "upperdir=", 9) == 0)
                {
                  free(upper);
                  upper = xstrdup(o + 9);
                }
              else if (strncmp(o, "workdir=", 8) == 0)
                {
                  free(work);
                  work = xstrdup(o + 8);
                }
              else
                append_opt(&fuse_opts, o);
            }
        }
      else if (strcmp(argv[i], "-f") == 0)
        continue; /* always in the foreground; accepted for fuse-overlayfs compatibility */
      else if (argv[i][0] == '-' || mountpoint != NULL)
        usage();
      else
        mountpoint = argv[i];
    }
  if (mountpoint == NULL || lower == NULL || upper == NULL || work == NULL)
    usage();

  /* The mount must not outlive the build that started it. */
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0)
    die_with_error("prctl(PR_SET_PDEATHSIG)");
  if (getppid() != parent)
    die("parent exited before the mount");
  umask(0);
  layers_init(lower, upper, work);

  char *fargv[] = { argv[0], (char *) "-o", fuse_opts, NULL };
  struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
  struct fuse_session *se = fuse_session_new(&args, &ovl_ops, sizeof(ovl_ops), NULL);
  if (se == NULL)
    die("cannot create the FUSE session (bad option in -o?)");
  ovl.se = se;
  if (fuse_set_signal_handlers(se) != 0)
    die("cannot install signal handlers");
  if (fuse_session_mount(se, mountpoint) != 0)
    die("cannot mount on %s", mountpoint);
  if (ready_fd >= 0)
    {
      if (write(ready_fd, "r", 1) != 1)
        die_with_error("cannot write to the ready fd %d", ready_fd);
      close(ready_fd);
    }
  int rc = fuse_session_loop(se);
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  fuse_session_destroy(se);
  fuse_opt_free_args(&args);
  return rc == 0 ? 0 : 1;
}
