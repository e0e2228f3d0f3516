/* A QEMU process that forks the VM backend's QEMU processes (LD_PRELOADed).
 *
 * Why: most of a restored child's private memory is QEMU's own, and ~4 MiB of
 * it is written before QEMU's main() even runs: the dynamic linker relocating
 * qemu-system-x86_64 and its ~50 libraries (tables of pointers, private in
 * every process that relocates them) and their constructors. A process forked
 * after that, instead of exec'd, shares those pages with its siblings until
 * one writes them. So the runtime starts QEMU once with this library
 * preloaded; it takes over just before main() (it wraps main through
 * __libc_start_main) and serves fork requests on a socket instead. Each child
 * puts the fds it was sent in place, does what the runtime's pre-exec hook
 * did (empty network namespace, no transparent huge pages, KSM mark), changes
 * directory and calls QEMU's real main() with the argv it was sent: from then
 * on it is an ordinary QEMU process, which builds every piece of its runtime
 * state (threads, event fds, io_uring) itself, after the fork.
 *
 * The only thread QEMU has before main() is its RCU thread (a constructor
 * starts it); QEMU's own pthread_atfork handler starts it again in a child,
 * as it does for -daemonize.
 *
 * Protocol (SOCK_SEQPACKET, one message each): a request is struct request,
 * then the working directory and argv as NUL-terminated strings, with nfds
 * descriptors to place and ncgroups cgroup.procs files to join attached; the answer is an event SPAWNED (pid, 0 or errno) with
 * the child's pidfd attached. EXITED (pid, wait status) events follow as
 * children end. READY (own pid) first. End of the socket ends this process.
 * Without FORKD_QEMU_ZYGOTE in its environment QEMU runs as if nothing was
 * preloaded.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dlfcn.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

enum { MAX_FDS = 16, MAX_ARGS = 512, MAX_TARGET = 1 << 20, MSG_SIZE = 65536 };
enum { FLAG_NEWNET = 1, FLAG_NO_THP = 2, FLAG_MERGEABLE = 4 };
enum { EV_READY = 0, EV_SPAWNED = 1, EV_EXITED = 2 };
#define MAGIC 0x6b71657aU /* "zeqk" */
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

struct request {
    unsigned magic, flags, nfds, argc;
    int target[MAX_FDS]; /* where each of the first nfds attached fds goes in the child */
    unsigned ncgroups;   /* then this many cgroup.procs files the child joins before main() */
};

struct event {
    int type, pid, value;
};

typedef int (*main_fn)(int, char **, char **);
static main_fn real_main;
static char msg_buf[MSG_SIZE];
static char *child_argv[MAX_ARGS + 1];

static void send_event(int sock, int type, int pid, int value, int fd) {
    struct event ev = {type, pid, value};
    struct iovec iov = {&ev, sizeof ev};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&u, 0, sizeof u);
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    while (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR) {
    }
}

/* In the child: the sent fds at their targets, nothing else open above stderr. */
static int place_fds(const int *fds, const int *target, unsigned n) {
    int moved[MAX_FDS], top = 2;
    for (unsigned i = 0; i < n; i++) top = target[i] > top ? target[i] : top;
    for (unsigned i = 0; i < n; i++) /* out of the way of every target first */
        if ((moved[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, top + 1)) < 0) return -1;
    for (unsigned i = 0; i < n; i++)
        if (dup2(moved[i], target[i]) < 0) return -1; /* the copy at the target is inheritable */
    for (int fd = 3; fd <= top; fd++) {
        int keep = 0;
        for (unsigned i = 0; i < n; i++) keep |= target[i] == fd;
        if (!keep) close(fd);
    }
    syscall(SYS_close_range, top + 1, ~0U, 0);
    return 0;
}

static int child(const struct request *r, const int *fds, const char *cwd) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    /* Into the VM's cgroups before QEMU allocates anything: its own memory counts against the VM. */
    for (unsigned i = 0; i < r->ncgroups; i++)
        if (write(fds[r->nfds + i], "0", 1) != 1) _exit(126);
    if (place_fds(fds, r->target, r->nfds) < 0) _exit(126);
    if ((r->flags & FLAG_NEWNET) && unshare(CLONE_NEWNET) != 0) _exit(126);
    if (r->flags & FLAG_NO_THP) prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
    if (r->flags & FLAG_MERGEABLE) prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0); /* the runtime checks it took */
    if (chdir(cwd) != 0) _exit(126);
    return real_main((int)r->argc, child_argv, environ);
}

/* One request: -1 when it is malformed (the runtime is then told EINVAL), else the fork's result. */
static int handle(int sock, int *is_child) {
    int fds[MAX_FDS], nfds = 0;
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {msg_buf, sizeof msg_buf - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n == 0) _exit(0); /* the runtime is gone */
    if (n < 0) {
        if (errno == EINTR) return 0;
        _exit(1);
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k && nfds < MAX_FDS; i++)
                memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
    struct request r;
    int err = 0;
    if ((size_t)n < sizeof r || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) err = EINVAL;
    if (!err) {
        memcpy(&r, msg_buf, sizeof r);
        if (r.magic != MAGIC || r.nfds > MAX_FDS || r.ncgroups > MAX_FDS || r.nfds + r.ncgroups != (unsigned)nfds ||
            r.argc < 1 || r.argc > MAX_ARGS)
            err = EINVAL;
        for (unsigned i = 0; !err && i < r.nfds; i++)
            if (r.target[i] < 0 || r.target[i] >= MAX_TARGET) err = EINVAL;
    }
    const char *cwd = msg_buf + sizeof r;
    msg_buf[n] = 0;
    if (!err) { /* the strings: cwd, then argc arguments, all inside the message */
        const char *p = cwd + strlen(cwd) + 1;
        for (unsigned i = 0; i < r.argc; i++) {
            if (p >= msg_buf + n) {
                err = EINVAL;
                break;
            }
            child_argv[i] = (char *)p;
            p += strlen(p) + 1;
        }
        child_argv[r.argc] = NULL;
    }
    int pid = -1;
    if (!err) {
        pid = fork();
        if (pid == 0) {
            *is_child = 1;
            close(sock);
            return child(&r, fds, cwd);
        }
        if (pid < 0) err = errno;
    }
    int pidfd = pid > 0 ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
    send_event(sock, EV_SPAWNED, pid, err, pidfd);
    if (pidfd >= 0) close(pidfd);
    for (int i = 0; i < nfds; i++) close(fds[i]);
    return 0;
}

static int serve(int sock, int argc, char **argv, char **envp) {
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) return real_main(argc, argv, envp);
    send_event(sock, EV_READY, getpid(), 0, -1);
    for (;;) {
        struct pollfd p[2] = {{.fd = sock, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            _exit(1);
        }
        if (p[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0) {
            }
            int status, pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) send_event(sock, EV_EXITED, pid, status, -1);
        }
        if (p[0].revents & POLLIN) {
            int is_child = 0;
            int ret = handle(sock, &is_child);
            if (is_child) return ret; /* QEMU's main() returned */
        } else if (p[0].revents & (POLLHUP | POLLERR)) {
            _exit(0);
        }
    }
}

static int wrapped_main(int argc, char **argv, char **envp) {
    const char *v = getenv("FORKD_QEMU_ZYGOTE");
    if (!v) return real_main(argc, argv, envp);
    int sock = atoi(v);
    unsetenv("FORKD_QEMU_ZYGOTE");
    unsetenv("LD_PRELOAD"); /* nothing QEMU starts should load this again */
    return serve(sock, argc, argv, environ);
}

typedef int (*start_fn)(main_fn, int, char **, void (*)(void), void (*)(void), void (*)(void), void *);

EXPORT int __libc_start_main(main_fn main, int argc, char **argv, void (*init)(void), void (*fini)(void),
                             void (*rtld_fini)(void), void *stack_end) {
    start_fn real = (start_fn)dlsym(RTLD_NEXT, "__libc_start_main");
    real_main = main;
    return real(wrapped_main, argc, argv, init, fini, rtld_fini, stack_end);
}
