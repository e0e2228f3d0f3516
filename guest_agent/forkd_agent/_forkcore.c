/* The zygote's fork path, in C.
 *
 * Why C: after a fork every page either process writes is copied, and on a
 * virtualised host each of those faults costs microseconds. Python writes
 * reference counts everywhere it goes, so the Python version of this path
 * copied ~100 pages in the zygote and ~330 in each child per sandbox: most of
 * a sandbox's start-up CPU. This file does the same steps touching only its
 * own stack and the buffers the zygote prepared (docs/process-backend.md,
 * "Native fork path").
 *
 * Freestanding (raw system calls, no libc): the zygote loads it into the
 * template's own interpreter, whose C library may differ from the host's that
 * compiled it. Loaded with ctypes.PyDLL: the GIL stays held across the call,
 * so a child that returns into Python finds the interpreter as it was.
 *
 * fk_fork() forks one child per fk_child and reports them `chunk` at a time on
 * the zygote's control socket itself: a `forked` notification (the same
 * message the Python path sends) with the chunk's channel fds attached. No
 * Python runs between two forks of a request, so nothing writes the zygote's
 * heap and its 2 MiB pages stay whole (each write to one shared with a live
 * child splits it back into 512 entries for every later fork to copy). In the
 * zygote it returns 0, or -errno if the control socket failed. A child sets up its sandbox, then answers `ping`
 * requests on its channel from here; on the first other frame it returns
 * index + 1 to Python with the unanswered bytes in plan->pending, and Python
 * starts the agent with them. A child whose setup fails reports on fd 2 and
 * exits 71; one whose channel closes exits 0.
 */

typedef unsigned long u64;
typedef long i64;

#if defined(__x86_64__)
enum {
    NR_read = 0, NR_write = 1, NR_open = 2, NR_close = 3, NR_socket = 41, NR_socketpair = 53,
    NR_clone = 56, NR_exit_group = 231, NR_ioctl = 16, NR_dup2 = 33, NR_chdir = 80,
    NR_mkdir = 83, NR_mount = 165, NR_umount2 = 166, NR_pivot_root = 155, NR_sethostname = 170,
    NR_prctl = 157, NR_setns = 308, NR_close_range = 436, NR_clock_gettime = 228, NR_sendmsg = 46,
};

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
    i64 ret;
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#else
#error "forkd's native fork path supports x86_64 only (the zygote falls back to Python elsewhere)"
#endif

#define S1(n, a) sys6(n, (i64)(a), 0, 0, 0, 0, 0)
#define S2(n, a, b) sys6(n, (i64)(a), (i64)(b), 0, 0, 0, 0)
#define S3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)
#define S5(n, a, b, c, d, e) sys6(n, (i64)(a), (i64)(b), (i64)(c), (i64)(d), (i64)(e), 0)

#define AF_UNIX 1
#define AF_INET 2
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOCK_CLOEXEC 02000000
#define O_WRONLY 01
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_DIRECTORY 0200000
#define O_NOFOLLOW 0400000
#define O_CLOEXEC 02000000
#define O_PATH 010000000
#define SIGCHLD 17
#define CLONE_NEWNET 0x40000000
#define MNT_DETACH 2
#define PR_SET_NO_NEW_PRIVS 38
#define PR_SET_SECCOMP 22
#define SECCOMP_MODE_FILTER 2
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define IFF_UP 1
#define CLOCK_REALTIME 0
#define EINTR 4

#define SOL_SOCKET 1
#define SCM_RIGHTS 1
#define MSG_NOSIGNAL 0x4000
#define MAX_CHUNK 64

#define CHANNEL_FD 3
#define MAX_MOUNTS 8
#define BUF 65536

struct fk_mount {
    const char *source, *target, *fstype;
    u64 flags;
    const char *data;
};

/* Built once by the zygote (forkd_agent._native.NativePlan); field order is the ctypes mirror's. */
struct fk_plan {
    u64 ns_flags;
    i64 home_netns;       /* the zygote's own network namespace, to return to */
    i64 layer_fd;         /* where a child keeps its writable layer open */
    i64 state_fd;         /* where a branch child keeps its saved state open */
    struct fk_mount private_root;
    const char *layer;
    u64 layer_flags;
    const char *subdirs[3];
    const char *root;
    i64 n_mounts;
    struct fk_mount mounts[MAX_MOUNTS];
    void *seccomp;        /* struct sock_fprog *, or 0 */
    char *pending;        /* a child's unanswered bytes on hand-over ... */
    i64 pending_len;      /* ... and how many */
};

/* One per child, filled by the zygote per request. */
struct fk_child {
    const char *id;
    const char *hostname;
    i64 hostname_len;
    const char *tmpfs_opts;
    const char *overlay_opts;
    const char *state_path; /* 0: not a branch child */
    const char *resolv;     /* 0: keep the template's */
    i64 resolv_len;
    i64 netns;              /* a pooled namespace (closed here), or -1: a fresh one */
    i64 pid;                /* unused: kept for the ctypes mirror's layout */
    i64 fd;
    i64 err;
};

/* The compiler may emit calls to these for initialisers and copies; there is no libc to supply them. */
__attribute__((visibility("hidden"))) void *memset(void *d, int v, unsigned long n) {
    unsigned char *p = d;
    while (n--) *p++ = (unsigned char)v;
    return d;
}

__attribute__((visibility("hidden"))) void *memcpy(void *d, const void *s, unsigned long n) {
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--) *p++ = *q++;
    return d;
}

__attribute__((visibility("hidden"))) void *memmove(void *d, const void *s, unsigned long n) {
    unsigned char *p = d;
    const unsigned char *q = s;
    if (p < q)
        while (n--) *p++ = *q++;
    else
        while (n--) p[n] = q[n];
    return d;
}

static i64 slen(const char *s) {
    i64 n = 0;
    while (s[n]) n++;
    return n;
}

static void put(int fd, const char *s) { S3(NR_write, fd, s, slen(s)); }

static void put_num(int fd, i64 v) {
    char b[24];
    int i = 23;
    int neg = v < 0;
    u64 u = neg ? (u64)-v : (u64)v;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (neg) b[--i] = '-';
    put(fd, b + i);
}

static void die(const struct fk_child *c, const char *step, i64 ret) {
    put(2, "forkd child ");
    put(2, c->id);
    put(2, ": setup failed: ");
    put(2, step);
    put(2, ": errno ");
    put_num(2, -ret);
    put(2, "\n");
    S1(NR_exit_group, 71);
    for (;;) {}
}

#define CHECK(expr, step)                  \
    do {                                   \
        i64 r_ = (expr);                   \
        if (r_ < 0) die(c, step, r_);      \
    } while (0)

static int mount_one(const struct fk_mount *m) {
    return (int)S5(NR_mount, m->source, m->target, m->fstype, m->flags, m->data);
}

static void move_fd(const struct fk_child *c, i64 fd, i64 want, const char *step) {
    if (fd == want) return;
    CHECK(S2(NR_dup2, fd, want), step);
    S1(NR_close, fd);
}

static void loopback_up(const struct fk_child *c) {
    char ifr[40] = {'l', 'o'};
    i64 s = S3(NR_socket, AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    CHECK(s, "socket for lo");
    CHECK(S3(NR_ioctl, s, SIOCGIFFLAGS, ifr), "get lo flags");
    *(unsigned short *)(ifr + 16) |= IFF_UP;
    CHECK(S3(NR_ioctl, s, SIOCSIFFLAGS, ifr), "bring lo up");
    S1(NR_close, s);
}

/* Mirror of forkd_agent._zygote._setup_sandbox: keep the two in step. */
static void setup(struct fk_plan *pl, const struct fk_child *c) {
    CHECK(mount_one(&pl->private_root), "make / private");
    CHECK(S5(NR_mount, "tmpfs", pl->layer, "tmpfs", pl->layer_flags, c->tmpfs_opts), "mount the writable layer");
    i64 fd = S3(NR_open, pl->layer, O_PATH | O_DIRECTORY, 0);
    CHECK(fd, "open the writable layer");
    move_fd(c, fd, pl->layer_fd, "keep the writable layer");
    for (int i = 0; i < 3; i++) CHECK(S2(NR_mkdir, pl->subdirs[i], 0755), "make layer directories");
    CHECK(S5(NR_mount, "overlay", pl->root, "overlay", 0, c->overlay_opts), "mount the root overlay");
    if (c->state_path) {
        fd = S3(NR_open, c->state_path, O_PATH | O_DIRECTORY | O_NOFOLLOW, 0);
        CHECK(fd, "open the branch state");
        move_fd(c, fd, pl->state_fd, "keep the branch state");
    }
    for (i64 i = 0; i < pl->n_mounts; i++) CHECK(mount_one(&pl->mounts[i]), pl->mounts[i].target);
    CHECK(S1(NR_chdir, pl->root), "enter the new root");
    /* Stack the new root over the old one and detach the old: no path leads back. */
    CHECK(S2(NR_pivot_root, ".", "."), "pivot_root");
    CHECK(S2(NR_umount2, ".", MNT_DETACH), "detach the old root");
    CHECK(S1(NR_chdir, "/"), "chdir /");
    CHECK(S2(NR_sethostname, c->hostname, c->hostname_len), "sethostname");
    if (c->netns < 0) loopback_up(c); /* pooled namespaces come with lo up */
    if (c->resolv) {
        fd = S3(NR_open, "/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        CHECK(fd, "open /etc/resolv.conf");
        CHECK(S3(NR_write, fd, c->resolv, c->resolv_len), "write /etc/resolv.conf");
        S1(NR_close, fd);
    }
    /* The zygote's log is a host file: a sandbox must not reach it through /proc/1/fd. */
    S2(NR_dup2, 0, 1);
    S2(NR_dup2, 0, 2);
    CHECK(S5(NR_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs");
    if (pl->seccomp) CHECK(S5(NR_prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, pl->seccomp, 0, 0), "seccomp");
}

/* ---- the ping loop: forkd.protocol frames (4-byte big-endian length + msgpack) ---- */

static int write_all(const char *p, i64 n) {
    while (n > 0) {
        i64 w = S3(NR_write, CHANNEL_FD, p, n);
        if (w == -EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

/* The msgpack encoding of a request id (a non-negative integer) at b: its length, or 0. */
static int id_len(const unsigned char *b, i64 avail) {
    if (avail < 1) return 0;
    int n = b[0] <= 0x7f ? 1 : b[0] == 0xcc ? 2 : b[0] == 0xcd ? 3 : b[0] == 0xce ? 5 : b[0] == 0xcf ? 9 : 0;
    return n <= avail ? n : 0;
}

/* Answer the frame if it is [REQUEST, id, "ping", params]; 0 if it is something else. */
static int answer_ping(const unsigned char *body, i64 size) {
    if (size < 3 || body[0] != 0x94 || body[1] != 0x00) return 0;
    int il = id_len(body + 2, size - 2);
    if (!il) return 0;
    const unsigned char *m = body + 2 + il;
    if (size - 2 - il < 6 || m[0] != 0xa4 || m[1] != 'p' || m[2] != 'i' || m[3] != 'n' || m[4] != 'g') return 0;
    struct { i64 sec, nsec; } ts;
    S2(NR_clock_gettime, CLOCK_REALTIME, &ts);
    union { double d; u64 u; } t = {.d = (double)ts.sec + (double)ts.nsec / 1e9};
    /* [RESPONSE, id, nil, {"pong": true, "time": <float64>}] */
    unsigned char out[4 + 3 + 9 + 1 + 1 + 5 + 1 + 5 + 9];
    int k = 4;
    out[k++] = 0x94;
    out[k++] = 0x01;
    for (int i = 0; i < il; i++) out[k++] = body[2 + i];
    out[k++] = 0xc0;
    out[k++] = 0x82;
    out[k++] = 0xa4, out[k++] = 'p', out[k++] = 'o', out[k++] = 'n', out[k++] = 'g';
    out[k++] = 0xc3;
    out[k++] = 0xa4, out[k++] = 't', out[k++] = 'i', out[k++] = 'm', out[k++] = 'e';
    out[k++] = 0xcb;
    for (int i = 7; i >= 0; i--) out[k++] = (unsigned char)(t.u >> (8 * i));
    u64 len = (u64)(k - 4);
    out[0] = 0, out[1] = 0, out[2] = (unsigned char)(len >> 8), out[3] = (unsigned char)len;
    return write_all((const char *)out, k) == 0 ? 1 : -1;
}

/* Serve pings until another frame arrives; leave the unanswered bytes in plan->pending. */
static void serve_pings(struct fk_plan *pl) {
    unsigned char *buf = (unsigned char *)pl->pending;
    i64 have = 0;
    for (;;) {
        while (have >= 4) {
            i64 size = ((i64)buf[0] << 24) | ((i64)buf[1] << 16) | ((i64)buf[2] << 8) | buf[3];
            if (size > BUF - 4) goto hand_over; /* the agent judges it */
            if (have < 4 + size) break;
            int r = answer_ping(buf + 4, size);
            if (r < 0) S1(NR_exit_group, 0); /* the runtime went away */
            if (r == 0) goto hand_over;
            have -= 4 + size;
            for (i64 i = 0; i < have; i++) buf[i] = buf[4 + size + i];
        }
        if (have == BUF) goto hand_over;
        i64 n = S3(NR_read, CHANNEL_FD, buf + have, BUF - have);
        if (n == -EINTR) continue;
        if (n <= 0) S1(NR_exit_group, 0); /* the runtime closed the channel */
        have += n;
    }
hand_over:
    pl->pending_len = have;
}

/* ---- the `forked` notification: [2, "forked", {"children": [{"id", "pid"}...], "errors": [{"id", "error"}...]}] ---- */

struct out {
    unsigned char *p, *end;
};

static void out_byte(struct out *o, unsigned char b) {
    if (o->p < o->end) *o->p++ = b;
}

static void out_bytes(struct out *o, const char *s, i64 n) {
    for (i64 i = 0; i < n; i++) out_byte(o, (unsigned char)s[i]);
}

static void out_str(struct out *o, const char *s) {
    i64 n = slen(s);
    if (n > 255) n = 255; /* ids are checked short by the zygote */
    if (n < 32) {
        out_byte(o, (unsigned char)(0xa0 | n));
    } else {
        out_byte(o, 0xd9);
        out_byte(o, (unsigned char)n);
    }
    out_bytes(o, s, n);
}

static void out_uint(struct out *o, u64 v) {
    out_byte(o, 0xce);
    for (int i = 3; i >= 0; i--) out_byte(o, (unsigned char)(v >> (8 * i)));
}

static void out_array(struct out *o, i64 n) {
    out_byte(o, 0xdc);
    out_byte(o, (unsigned char)(n >> 8));
    out_byte(o, (unsigned char)n);
}

/* Send one chunk's notification with the channels of those that exist; close our copies. */
static i64 report(i64 control, const struct fk_child *kids, i64 n, const i64 *pids, const int *fds,
                  const i64 *errs) {
    unsigned char body[MAX_CHUNK * 80 + 64];
    struct out o = {body, body + sizeof body};
    i64 ok = 0;
    for (i64 i = 0; i < n; i++) ok += pids[i] > 0;
    out_byte(&o, 0x93);
    out_byte(&o, 0x02);
    out_str(&o, "forked");
    out_byte(&o, 0x82);
    out_str(&o, "children");
    out_array(&o, ok);
    for (i64 i = 0; i < n; i++) {
        if (pids[i] <= 0) continue;
        out_byte(&o, 0x82);
        out_str(&o, "id");
        out_str(&o, kids[i].id);
        out_str(&o, "pid");
        out_uint(&o, (u64)pids[i]);
    }
    out_str(&o, "errors");
    out_array(&o, n - ok);
    for (i64 i = 0; i < n; i++) {
        if (pids[i] > 0) continue;
        char msg[40] = "OSError: errno ";
        int k = 15;
        char digits[24];
        int d = 0;
        u64 e = (u64)errs[i];
        do {
            digits[d++] = (char)('0' + e % 10);
            e /= 10;
        } while (e && d < 20);
        while (d) msg[k++] = digits[--d];
        msg[k] = 0;
        out_byte(&o, 0x82);
        out_str(&o, "id");
        out_str(&o, kids[i].id);
        out_str(&o, "error");
        out_str(&o, msg);
    }
    struct { u64 base, len; } iov = {(u64)body, (u64)(o.p - body)};
    union {
        struct { u64 len; int level, type; int fds[MAX_CHUNK]; } c;
        u64 align;
    } cm;
    int k = 0;
    for (i64 i = 0; i < n; i++)
        if (pids[i] > 0) cm.c.fds[k++] = fds[i];
    struct {
        void *name;
        int namelen;
        void *iov;
        u64 iovlen;
        void *control;
        u64 controllen;
        int flags;
    } msg = {0, 0, &iov, 1, 0, 0, 0};
    if (k) {
        cm.c.len = 16 + 4 * (u64)k;
        cm.c.level = SOL_SOCKET;
        cm.c.type = SCM_RIGHTS;
        msg.control = &cm;
        msg.controllen = (16 + 4 * (u64)k + 7) & ~7UL;
    }
    i64 r = o.p < o.end ? S3(NR_sendmsg, control, &msg, MSG_NOSIGNAL) : -90; /* EMSGSIZE */
    for (int i = 0; i < k; i++) S1(NR_close, cm.c.fds[i]);
    return r < 0 ? r : 0;
}

/* pending must hold BUF bytes; kids are only read here (the zygote's own memory stays unwritten). */
__attribute__((visibility("default"))) i64 fk_fork(struct fk_plan *pl, struct fk_child *kids, i64 n, i64 chunk,
                                                   i64 control) {
    i64 pids[MAX_CHUNK], errs[MAX_CHUNK];
    int fds[MAX_CHUNK];
    if (chunk < 1 || chunk > MAX_CHUNK) chunk = MAX_CHUNK;
    i64 failed = 0;
    for (i64 base = 0; base < n; base += chunk) {
        i64 m = n - base < chunk ? n - base : chunk;
        for (i64 j = 0; j < m; j++) {
            struct fk_child *c = &kids[base + j];
            int sv[2];
            pids[j] = -1;
            fds[j] = -1;
            errs[j] = 0;
            i64 r = S5(NR_socketpair, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv, 0);
            if (r < 0) {
                errs[j] = -r;
                if (c->netns >= 0) S1(NR_close, c->netns);
                continue;
            }
            u64 flags = pl->ns_flags | SIGCHLD;
            if (c->netns >= 0) {
                r = S2(NR_setns, c->netns, CLONE_NEWNET); /* the child inherits whatever we are in */
                if (r < 0) flags |= CLONE_NEWNET;
            } else {
                flags |= CLONE_NEWNET;
            }
            i64 pid = S5(NR_clone, flags, 0, 0, 0, 0);
            if (pid == 0) {
                struct fk_child me = *c; /* on our own stack: the zygote's copy stays shared */
                if (flags & CLONE_NEWNET) me.netns = -1;
                S1(NR_close, sv[0]);
                move_fd(&me, sv[1], CHANNEL_FD, "channel");
                S3(NR_close_range, CHANNEL_FD + 1, ~0U, 0);
                setup(pl, &me);
                serve_pings(pl);
                return base + j + 1;
            }
            if (c->netns >= 0) {
                S2(NR_setns, pl->home_netns, CLONE_NEWNET);
                S1(NR_close, c->netns);
            }
            S1(NR_close, sv[1]);
            if (pid < 0) {
                S1(NR_close, sv[0]);
                errs[j] = -pid;
                continue;
            }
            pids[j] = pid;
            fds[j] = sv[0];
        }
        i64 r = report(control, kids + base, m, pids, fds, errs);
        if (r < 0 && !failed) failed = r;
    }
    return failed;
}

/* ---- fk_spawn: start a command as another user without fork ----
 *
 * The agent runs in a sandbox as root and starts every command as the
 * sandbox's user. CPython forks (rather than vforks) whenever it must change
 * the uid, copying the agent's page tables: milliseconds where each page fault
 * is a hypervisor trip. A setpriv exec in between costs ~1 ms of loading. Here
 * the child shares the agent's memory (CLONE_VM | CLONE_VFORK: the agent waits
 * until it execs or exits) and switches user itself, touching only its own
 * stack and the request.
 */

enum {
    NR_rt_sigaction = 13, NR_rt_sigprocmask = 14, NR_fcntl = 72, NR_setsid = 112, NR_setgroups = 116,
    NR_setresuid = 117, NR_setresgid = 119, NR_execve = 59, NR_exit = 60, NR_wait4 = 61,
};

#define CLONE_VM 0x00000100
#define CLONE_VFORK 0x00004000
#define SIG_SETMASK 2
#define F_DUPFD_CLOEXEC 1030
#define F_SETFD 2
#define O_RDWR 02
#define SIGKILL 9
#define SIGPIPE 13
#define SIGSTOP 19
#define SIGXFSZ 25
#define NSIG 64
#define SPAWN_STACK 32768

/* Field order is _native.SpawnRequest's. */
struct fk_spawn_req {
    const char *path;       /* absolute: PATH lookup is the caller's */
    char *const *argv;
    char *const *envp;
    const char *cwd;        /* 0: the agent's */
    i64 fds[3];             /* the child's 0, 1, 2; -1: /dev/null */
    const int *keep;        /* fds >= 3 the child keeps (pass_fds), ascending */
    i64 n_keep;
    const unsigned int *groups;
    i64 n_groups;
    i64 uid, gid;           /* -1: keep the agent's */
    i64 err;                /* out: errno of the failed step ... */
    i64 step;               /* ... and which (FK_STEP_*) */
};

enum { FK_STEP_CLONE = 1, FK_STEP_SIGNALS, FK_STEP_SETSID, FK_STEP_STDIO, FK_STEP_FDS, FK_STEP_CHDIR,
       FK_STEP_SETGROUPS, FK_STEP_SETGID, FK_STEP_SETUID, FK_STEP_EXEC };

struct spawn_arg {
    struct fk_spawn_req *req;
    u64 mask; /* the agent's signal mask before it blocked everything */
};

struct k_sigaction {
    u64 handler, flags, restorer, mask;
};

static char spawn_stack[SPAWN_STACK] __attribute__((aligned(16)));

__attribute__((noreturn)) static void spawn_fail(struct fk_spawn_req *r, i64 step, i64 ret) {
    r->err = -ret;
    r->step = step;
    for (;;) S1(NR_exit, 127);
}

#define TRY(expr, step)                        \
    do {                                       \
        i64 r_ = (expr);                       \
        if (r_ < 0) spawn_fail(r, step, r_);   \
    } while (0)

/* Runs in the child, on spawn_stack; never returns. */
__attribute__((noreturn, used)) static void spawn_child(struct spawn_arg *a) {
    struct fk_spawn_req *r = a->req;
    /* The child has its own copy of the handler table: the agent's (Python's
     * C-level trampolines writing into its memory) must never run here. Like
     * Popen(restore_signals=True), the signals Python ignores get their
     * defaults back. */
    for (int sig = 1; sig <= NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        struct k_sigaction old;
        if (S5(NR_rt_sigaction, sig, 0, &old, 8, 0) < 0) continue;
        int reset = old.handler > 1 || (old.handler == 1 && (sig == SIGPIPE || sig == SIGXFSZ));
        if (reset) {
            struct k_sigaction dfl = {0, 0, 0, 0};
            TRY(S5(NR_rt_sigaction, sig, &dfl, 0, 8, 0), FK_STEP_SIGNALS);
        }
    }
    TRY(S5(NR_rt_sigprocmask, SIG_SETMASK, &a->mask, 0, 8, 0), FK_STEP_SIGNALS);
    TRY(S1(NR_setsid, 0), FK_STEP_SETSID);
    i64 src[3];
    for (int i = 0; i < 3; i++) {
        src[i] = r->fds[i];
        if (src[i] < 0) {
            src[i] = S3(NR_open, "/dev/null", O_RDWR | O_CLOEXEC, 0);
            TRY(src[i], FK_STEP_STDIO);
        }
    }
    /* A source among 0..2 could be overwritten by an earlier dup2: move it up first. */
    for (int i = 0; i < 3; i++)
        if (src[i] < 3 && src[i] != i) TRY(src[i] = S3(NR_fcntl, src[i], F_DUPFD_CLOEXEC, 3), FK_STEP_STDIO);
    for (int i = 0; i < 3; i++) {
        if (src[i] == i)
            TRY(S3(NR_fcntl, i, F_SETFD, 0), FK_STEP_STDIO);
        else
            TRY(S2(NR_dup2, src[i], i), FK_STEP_STDIO);
    }
    /* Close every fd >= 3 but the kept ones, whose close-on-exec flag goes. */
    i64 lo = 3;
    for (i64 k = 0; k < r->n_keep; k++) {
        i64 fd = r->keep[k];
        if (fd < lo) continue;
        TRY(S3(NR_fcntl, fd, F_SETFD, 0), FK_STEP_FDS);
        if (fd > lo) TRY(S3(NR_close_range, lo, fd - 1, 0), FK_STEP_FDS);
        lo = fd + 1;
    }
    TRY(S3(NR_close_range, lo, ~0U, 0), FK_STEP_FDS);
    if (r->cwd) TRY(S1(NR_chdir, r->cwd), FK_STEP_CHDIR);
    if (r->n_groups >= 0) TRY(S2(NR_setgroups, r->n_groups, r->groups), FK_STEP_SETGROUPS);
    if (r->gid >= 0) TRY(S3(NR_setresgid, r->gid, r->gid, r->gid), FK_STEP_SETGID);
    if (r->uid >= 0) TRY(S3(NR_setresuid, r->uid, r->uid, r->uid), FK_STEP_SETUID);
    spawn_fail(r, FK_STEP_EXEC, S3(NR_execve, r->path, r->argv, r->envp));
}

/* clone() whose child calls fn(arg) on `stack_top` (16-byte aligned); the parent gets the pid or -errno. */
static i64 clone_call(u64 flags, void *stack_top, void (*fn)(struct spawn_arg *), struct spawn_arg *arg) {
    i64 ret;
    register i64 r10 __asm__("r10") = 0;
    register i64 r8 __asm__("r8") = 0;
    register void *r12 __asm__("r12") = (void *)fn;
    register void *r13 __asm__("r13") = arg;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "hlt\n"
        "1:"
        : "=a"(ret)
        : "a"(NR_clone), "D"(flags), "S"(stack_top), "d"(0), "r"(r10), "r"(r8), "r"(r12), "r"(r13)
        : "rcx", "r11", "memory", "cc");
    return ret;
}

/* The pid, or -errno with r->step saying which step failed (a child that
 * failed after the clone has been reaped here). Call with r->err = 0. */
__attribute__((visibility("default"))) i64 fk_spawn(struct fk_spawn_req *r) {
    struct spawn_arg a = {r, 0};
    u64 all = ~0UL;
    i64 ret = S5(NR_rt_sigprocmask, SIG_SETMASK, &all, &a.mask, 8, 0);
    if (ret < 0) {
        r->step = FK_STEP_SIGNALS;
        return ret;
    }
    r->err = 0;
    i64 pid = clone_call(CLONE_VM | CLONE_VFORK | SIGCHLD, spawn_stack + SPAWN_STACK, spawn_child, &a);
    if (pid < 0) {
        r->step = FK_STEP_CLONE;
    } else if (r->err) {
        /* Exited before exec: reap it now (as Popen does); nobody else knows its pid. */
        while (S5(NR_wait4, pid, 0, 0, 0, 0) == -EINTR) {}
        pid = -r->err;
    }
    S5(NR_rt_sigprocmask, SIG_SETMASK, &a.mask, 0, 8, 0);
    return pid;
}
