/* rbuild-notify: answers the hot, simple seccomp notifications of a single-uid RUN, forwards the rest.
 *
 *   rbuild-notify CTL_FD UID GID RECORDS
 *
 * Started by rootless/sandbox/notify.py for each single-uid RUN (docs/isolation.md). CTL_FD is a
 * SOCK_SEQPACKET socket to that Python supervisor. Messages from it: "L" with the seccomp listener fd
 * (SCM_RIGHTS, the first message), "I" (a process switched ids: every get*id is forwarded from now),
 * "R" (an entry of the tree may hold a record: every stat is looked at), "Q" (quit). To it: each
 * notification this process does not answer (the raw struct seccomp_notif; Python answers it on its
 * own copy of the listener), and at the end "C" followed by (arch, nr, count) triples of the calls
 * answered here. UID GID: the RUN's USER; RECORDS: 1 if a lower layer holds a record.
 *
 * Ends when every process of the RUN is gone (the listener hangs up), on "Q", when CTL_FD closes, or
 * when its parent dies. Exit status 0, or 1 with one line on stderr.
 */
#define _GNU_SOURCE
#include "notify.h"

#include "../util.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#define MAX_COUNTED 64

struct counted
{
  uint32_t arch, nr;
  uint64_t count;
};

static struct counted counts[MAX_COUNTED];
static size_t n_counts;

static void count (const struct seccomp_notif *req)
{
  for (size_t i = 0; i < n_counts; i++)
    if (counts[i].arch == req->data.arch && counts[i].nr == (uint32_t) req->data.nr)
      {
        counts[i].count++;
        return;
      }
  if (n_counts < MAX_COUNTED)
    counts[n_counts++] = (struct counted) { req->data.arch, (uint32_t) req->data.nr, 1 };
}

static void send_counts_and_exit (int ctl)
{
  char msg[1 + sizeof counts];
  msg[0] = 'C';
  memcpy (msg + 1, counts, n_counts * sizeof counts[0]);
  (void) send (ctl, msg, 1 + n_counts * sizeof counts[0], MSG_NOSIGNAL);
  exit (0);
}

static int recv_listener (int ctl)
{
  char c = 0, buf[CMSG_SPACE (sizeof (int))];
  struct iovec io = { &c, 1 };
  struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf };
  int fd = -1;
  if (recvmsg (ctl, &m, MSG_CMSG_CLOEXEC) <= 0)
    exit (0); /* the RUN never started its filter: the supervisor closed the socket */
  struct cmsghdr *cm = CMSG_FIRSTHDR (&m);
  if (c == 'Q')
    exit (0); /* the RUN never started its filter */
  if (c != 'L' || cm == NULL || cm->cmsg_type != SCM_RIGHTS)
    die ("the first message is not the listener");
  memcpy (&fd, CMSG_DATA (cm), sizeof fd);
  return fd;
}

/* Reads the supervisor's messages; false when it is gone or says quit. */
static bool read_ctl (struct front *f)
{
  char msg[16];
  for (;;)
    {
      ssize_t n = recv (f->ctl, msg, sizeof msg, MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return true;
      if (n <= 0)
        return false;
      if (msg[0] == 'I')
        f->ids = true;
      else if (msg[0] == 'R')
        f->records = true;
      else if (msg[0] == 'Q')
        send_counts_and_exit (f->ctl);
      else
        die ("unknown message %c", msg[0]);
    }
}

static void serve_one (const struct front *f)
{
  struct seccomp_notif req;
  memset (&req, 0, sizeof req);
  if (ioctl (f->listener, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0)
    {
      if (errno == ENOENT || errno == EINTR)
        return; /* the caller died (or was killed) meanwhile */
      die_with_error ("seccomp notification");
    }
  int64_t value = 0;
  enum verdict v = answer (f, &req, &value);
  if (v == VERDICT_FORWARD)
    {
      if (send (f->ctl, &req, sizeof req, MSG_NOSIGNAL) != (ssize_t) sizeof req)
        die_with_error ("forwarding a notification");
      return;
    }
  count (&req);
  struct seccomp_notif_resp resp = { .id = req.id };
  if (v == VERDICT_CONTINUE)
    resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  else
    resp.val = value;
  if (ioctl (f->listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) != 0 && errno != ENOENT)
    die_with_error ("seccomp answer"); /* ENOENT: the caller is gone (killed by a signal) */
}

static uint32_t parse_id (const char *s)
{
  char *end;
  errno = 0;
  unsigned long v = strtoul (s, &end, 10);
  if (errno != 0 || *end != '\0' || end == s || v > UINT32_MAX)
    die ("bad id %s", s);
  return (uint32_t) v;
}

int main (int argc, char **argv)
{
  if (argc != 5)
    {
      fputs ("usage: rbuild-notify CTL_FD UID GID RECORDS\n", stderr);
      return 2;
    }
  if (prctl (PR_SET_PDEATHSIG, SIGKILL) != 0)
    die_with_error ("prctl");
  struct front f = {
    .listener = -1,
    .ctl = (int) parse_id (argv[1]),
    .uid = parse_id (argv[2]),
    .gid = parse_id (argv[3]),
    .records = strcmp (argv[4], "0") != 0,
  };
  f.listener = recv_listener (f.ctl);
  struct pollfd fds[2] = { { f.ctl, POLLIN, 0 }, { f.listener, POLLIN, 0 } };
  for (;;)
    {
      if (poll (fds, 2, -1) < 0)
        {
          if (errno == EINTR)
            continue;
          die_with_error ("poll");
        }
      /* the supervisor's messages first: an "I" sent before it answered a setuid must be seen before
       * the getuid that follows it */
      if (fds[0].revents && !read_ctl (&f))
        return 0;
      if (fds[1].revents & POLLIN)
        serve_one (&f);
      else if (fds[1].revents & (POLLHUP | POLLERR))
        send_counts_and_exit (f.ctl); /* every process of the RUN is gone */
    }
}
