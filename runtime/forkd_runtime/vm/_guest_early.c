/* The VM guest's first answers, in C: `ping` and `identity.refresh`.
 *
 * Why C: under TCG a child restored from the parent's snapshot translates anew
 * every piece of guest code it runs, and that translation is most of what a
 * child costs (CPU on the way to ready, and the translated code is the largest
 * part of each QEMU process's private memory). Served by the interpreter, the
 * identity refresh alone ran ~5.7k distinct blocks of CPython; this loop runs a
 * few hundred. The parent is snapshotted while blocked in this file's read(),
 * so a child runs nothing but this until the host asks for something else.
 *
 * Frames are forkd.protocol's (4-byte big-endian length + msgpack). A frame
 * this loop is not sure about (another method, an unusual parameter, a value
 * Python would reject, a system call that failed) goes back to Python whole,
 * which answers it exactly as before: every step of a refresh can be done
 * again, so handing over after a partial attempt changes nothing. Only a
 * fully successful refresh is answered here.
 *
 * Python's `random` is not touched here (it lives in the interpreter): the
 * caller seeds it from `material` as soon as this returns, before any Python
 * runs that could draw from it, and the report's `random_fingerprint` is
 * computed here from the same material with CPython's own algorithm (seeding
 * from bytes: SHA-512, then MT19937's init_by_array).
 *
 * Freestanding (raw system calls, no libc): it is loaded into the template's
 * interpreter, whose C library is not the host's that compiled it.
 */

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned char u8;

#if !defined(__x86_64__)
#error "the VM guest's native early loop supports x86_64 only (the guest falls back to Python)"
#endif

enum {
    NR_read = 0, NR_write = 1, NR_ioctl = 16, NR_nanosleep = 35, NR_sethostname = 170,
    NR_clock_settime = 227, NR_clock_gettime = 228, NR_getrandom = 318,
};

static i64 sys3(i64 n, i64 a, i64 b, i64 c) {
    i64 ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

#define S1(n, a) sys3(n, (i64)(a), 0, 0)
#define S2(n, a, b) sys3(n, (i64)(a), (i64)(b), 0)
#define S3(n, a, b, c) sys3(n, (i64)(a), (i64)(b), (i64)(c))

#define EINTR 4
#define CLOCK_REALTIME 0
#define RNDADDENTROPY 0x40085203
#define RNDRESEEDCRNG 0x5207

#define MIN_ENTROPY 32
#define MAX_ENTROPY 4096
#define HOSTNAME_MAX 64
#define SANDBOX_ID_MAX 256
#define DEFAULT_CLOCK_TOLERANCE 0.05

/* Shared with _guest.py (ctypes.Structure _EarlyState): keep in step. */
struct fk_early {
    i64 fd;         /* the agent's port, blocking */
    u8 *buf;        /* out: the unanswered bytes, from the first frame for Python on */
    i64 cap, len;
    i64 numpy;      /* in: numpy is loaded (the report says its state is seeded, at the hand-over) */
    i64 urandom_fd; /* in: /dev/urandom, opened read-write once in the parent (or -1) */
    i64 etc_hostname; /* in: this is PID 1 and /etc/hostname is writable (Python then rewrites it) */
    i64 refreshed;  /* out: refreshes answered here since the caller last cleared it */
    i64 sandbox_id_len;
    char sandbox_id[SANDBOX_ID_MAX];  /* in/out */
    i64 material_len;
    u8 material[MAX_ENTROPY];  /* out: the last refresh's entropy, to seed `random` (and numpy) from */
};

/* ---- SHA-512 (FIPS 180-4) ---- */

static const u64 K512[80] = {
    0x428a2f98d728ae22UL, 0x7137449123ef65cdUL, 0xb5c0fbcfec4d3b2fUL, 0xe9b5dba58189dbbcUL, 0x3956c25bf348b538UL,
    0x59f111f1b605d019UL, 0x923f82a4af194f9bUL, 0xab1c5ed5da6d8118UL, 0xd807aa98a3030242UL, 0x12835b0145706fbeUL,
    0x243185be4ee4b28cUL, 0x550c7dc3d5ffb4e2UL, 0x72be5d74f27b896fUL, 0x80deb1fe3b1696b1UL, 0x9bdc06a725c71235UL,
    0xc19bf174cf692694UL, 0xe49b69c19ef14ad2UL, 0xefbe4786384f25e3UL, 0x0fc19dc68b8cd5b5UL, 0x240ca1cc77ac9c65UL,
    0x2de92c6f592b0275UL, 0x4a7484aa6ea6e483UL, 0x5cb0a9dcbd41fbd4UL, 0x76f988da831153b5UL, 0x983e5152ee66dfabUL,
    0xa831c66d2db43210UL, 0xb00327c898fb213fUL, 0xbf597fc7beef0ee4UL, 0xc6e00bf33da88fc2UL, 0xd5a79147930aa725UL,
    0x06ca6351e003826fUL, 0x142929670a0e6e70UL, 0x27b70a8546d22ffcUL, 0x2e1b21385c26c926UL, 0x4d2c6dfc5ac42aedUL,
    0x53380d139d95b3dfUL, 0x650a73548baf63deUL, 0x766a0abb3c77b2a8UL, 0x81c2c92e47edaee6UL, 0x92722c851482353bUL,
    0xa2bfe8a14cf10364UL, 0xa81a664bbc423001UL, 0xc24b8b70d0f89791UL, 0xc76c51a30654be30UL, 0xd192e819d6ef5218UL,
    0xd69906245565a910UL, 0xf40e35855771202aUL, 0x106aa07032bbd1b8UL, 0x19a4c116b8d2d0c8UL, 0x1e376c085141ab53UL,
    0x2748774cdf8eeb99UL, 0x34b0bcb5e19b48a8UL, 0x391c0cb3c5c95a63UL, 0x4ed8aa4ae3418acbUL, 0x5b9cca4f7763e373UL,
    0x682e6ff3d6b2b8a3UL, 0x748f82ee5defb2fcUL, 0x78a5636f43172f60UL, 0x84c87814a1f0ab72UL, 0x8cc702081a6439ecUL,
    0x90befffa23631e28UL, 0xa4506cebde82bde9UL, 0xbef9a3f7b2c67915UL, 0xc67178f2e372532bUL, 0xca273eceea26619cUL,
    0xd186b8c721c0c207UL, 0xeada7dd6cde0eb1eUL, 0xf57d4f7fee6ed178UL, 0x06f067aa72176fbaUL, 0x0a637dc5a2c898a6UL,
    0x113f9804bef90daeUL, 0x1b710b35131c471bUL, 0x28db77f523047d84UL, 0x32caab7b40c72493UL, 0x3c9ebe0a15c9bebcUL,
    0x431d67c49c100d4cUL, 0x4cc5d4becb3e42b6UL, 0x597f299cfc657e2aUL, 0x5fcb6fab3ad6faecUL, 0x6c44198c4a475817UL,
};

struct sha512 {
    u64 h[8];
    u8 block[128];
    u64 used, total;
};

static u64 ror(u64 x, int n) { return (x >> n) | (x << (64 - n)); }

static void sha512_block(struct sha512 *s) {
    u64 w[80];
    for (int i = 0; i < 16; i++) {
        u64 v = 0;
        for (int j = 0; j < 8; j++) v = (v << 8) | s->block[8 * i + j];
        w[i] = v;
    }
    for (int i = 16; i < 80; i++) {
        u64 s0 = ror(w[i - 15], 1) ^ ror(w[i - 15], 8) ^ (w[i - 15] >> 7);
        u64 s1 = ror(w[i - 2], 19) ^ ror(w[i - 2], 61) ^ (w[i - 2] >> 6);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    u64 a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 80; i++) {
        u64 t1 = h + (ror(e, 14) ^ ror(e, 18) ^ ror(e, 41)) + ((e & f) ^ (~e & g)) + K512[i] + w[i];
        u64 t2 = (ror(a, 28) ^ ror(a, 34) ^ ror(a, 39)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d;
    s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha512_init(struct sha512 *s) {
    static const u64 iv[8] = {
        0x6a09e667f3bcc908UL, 0xbb67ae8584caa73bUL, 0x3c6ef372fe94f82bUL, 0xa54ff53a5f1d36f1UL,
        0x510e527fade682d1UL, 0x9b05688c2b3e6c1fUL, 0x1f83d9abfb41bd6bUL, 0x5be0cd19137e2179UL,
    };
    for (int i = 0; i < 8; i++) s->h[i] = iv[i];
    s->used = 0, s->total = 0;
}

static void sha512_update(struct sha512 *s, const u8 *p, i64 n) {
    for (i64 i = 0; i < n; i++) {
        s->block[s->used++] = p[i];
        if (s->used == 128) sha512_block(s), s->used = 0;
    }
    s->total += (u64)n;
}

static void sha512_final(struct sha512 *s, u8 out[64]) {
    u64 bits = s->total * 8;
    u8 pad = 0x80;
    sha512_update(s, &pad, 1);
    pad = 0;
    while (s->used != 112) sha512_update(s, &pad, 1);
    for (int i = 0; i < 8; i++) s->block[112 + i] = 0; /* the high 64 bits of the 128-bit length */
    for (int i = 0; i < 8; i++) s->block[120 + i] = (u8)(bits >> (56 - 8 * i));
    sha512_block(s);
    for (int i = 0; i < 64; i++) out[i] = (u8)(s->h[i / 8] >> (56 - 8 * (i % 8)));
}

/* ---- CPython's random: seed(bytes) and the first getrandbits(64) ---- */

#define MT_N 624
#define MT_M 397

static u32 mt[MT_N];

static void mt_init_by_array(const u32 *key, int len) {
    mt[0] = 19650218U;
    for (int i = 1; i < MT_N; i++) mt[i] = 1812433253U * (mt[i - 1] ^ (mt[i - 1] >> 30)) + (u32)i;
    int i = 1, j = 0;
    for (int k = MT_N > len ? MT_N : len; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525U)) + key[j] + (u32)j;
        i++, j++;
        if (i >= MT_N) mt[0] = mt[MT_N - 1], i = 1;
        if (j >= len) j = 0;
    }
    for (int k = MT_N - 1; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941U)) - (u32)i;
        i++;
        if (i >= MT_N) mt[0] = mt[MT_N - 1], i = 1;
    }
    mt[0] = 0x80000000U;
}

/* The first two outputs after seeding (the state is fresh: one full twist). */
static u64 mt_first64(void) {
    static const u32 mag01[2] = {0x0U, 0x9908b0dfU};
    for (int k = 0; k < MT_N; k++) {
        u32 y = (mt[k] & 0x80000000U) | (mt[(k + 1) % MT_N] & 0x7fffffffU);
        mt[k] = mt[(k + MT_M) % MT_N] ^ (y >> 1) ^ mag01[y & 1];
    }
    u32 out[2];
    for (int k = 0; k < 2; k++) {
        u32 y = mt[k];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680U;
        y ^= (y << 15) & 0xefc60000U;
        y ^= y >> 18;
        out[k] = y;
    }
    return (u64)out[0] | ((u64)out[1] << 32); /* getrandbits fills the least significant word first */
}

/* identity._refresh_random's seed, then random_fingerprint(): the next 64 bits as 16 hex digits. */
static void fingerprint(const u8 *material, i64 n, char hex[16]) {
    static const char label[] = "forkd.identity.random"; /* _derive(b"random", material) */
    struct sha512 s;
    u8 seed[128];
    sha512_init(&s);
    sha512_update(&s, (const u8 *)label, sizeof label); /* with its NUL: the separator */
    sha512_update(&s, material, n);
    sha512_final(&s, seed);
    /* random.seed(bytes): int.from_bytes(seed + sha512(seed).digest(), "big") */
    sha512_init(&s);
    sha512_update(&s, seed, 64);
    sha512_final(&s, seed + 64);
    int top = 0;
    while (top < 128 && seed[top] == 0) top++;
    int bytes = 128 - top;
    int words = bytes == 0 ? 1 : (bytes + 3) / 4;
    u32 key[32];
    for (int w = 0; w < words; w++) {
        u32 v = 0;
        for (int b = 3; b >= 0; b--) {
            int at = 127 - (4 * w + b); /* big-endian bytes, least significant word first */
            v = (v << 8) | (at >= 0 ? seed[at] : 0);
        }
        key[w] = v;
    }
    mt_init_by_array(key, words);
    u64 r = mt_first64();
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) hex[i] = digits[(r >> (60 - 4 * i)) & 0xf];
}

/* ---- msgpack: just what these two requests need ---- */

struct rd {
    const u8 *p, *end;
    int bad;
};

static u64 rd_be(struct rd *r, int n) {
    if (r->end - r->p < n) {
        r->bad = 1;
        return 0;
    }
    u64 v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | *r->p++;
    return v;
}

static int rd_byte(struct rd *r) { return (int)rd_be(r, 1); }

/* A str or bin of kind `want` ('s' or 'b'): its bytes and length, or -1. ASCII only for str. */
static i64 rd_bytes(struct rd *r, int b, int want, const u8 **out) {
    i64 n;
    int kind = 's';
    if (b >= 0xa0 && b <= 0xbf) n = b & 0x1f;
    else if (b == 0xd9) n = (i64)rd_be(r, 1);
    else if (b == 0xda) n = (i64)rd_be(r, 2);
    else if (b == 0xdb) n = (i64)rd_be(r, 4);
    else if (b == 0xc4) n = (i64)rd_be(r, 1), kind = 'b';
    else if (b == 0xc5) n = (i64)rd_be(r, 2), kind = 'b';
    else if (b == 0xc6) n = (i64)rd_be(r, 4), kind = 'b';
    else return -1;
    if (r->bad || kind != want || r->end - r->p < n) return -1;
    *out = r->p;
    r->p += n;
    if (kind == 's')
        for (i64 i = 0; i < n; i++)
            if ((*out)[i] & 0x80) return -1; /* UTF-8 checks are Python's to do */
    return n;
}

/* A number (int or float, not bool): 1 and *v, 0 for nil, -1 for anything else. */
static int rd_number(struct rd *r, int b, double *v) {
    if (b == 0xc0) return 0;
    if (b <= 0x7f) *v = b;
    else if (b >= 0xe0) *v = b - 256;
    else if (b == 0xcc || b == 0xcd || b == 0xce || b == 0xcf) *v = (double)rd_be(r, 1 << (b - 0xcc));
    else if (b == 0xd0) *v = (double)(signed char)rd_be(r, 1);
    else if (b == 0xd1) *v = (double)(short)rd_be(r, 2);
    else if (b == 0xd2) *v = (double)(int)rd_be(r, 4);
    else if (b == 0xd3) *v = (double)(i64)rd_be(r, 8);
    else if (b == 0xcb) {
        union { u64 u; double d; } x = {.u = rd_be(r, 8)};
        *v = x.d;
    } else if (b == 0xca) {
        union { u32 u; float f; } x = {.u = (u32)rd_be(r, 4)};
        *v = x.f;
    } else return -1;
    return r->bad ? -1 : 1;
}

/* Skip one value of any kind; 0, or -1 (malformed, too deep, or a str Python must judge). */
static int rd_skip(struct rd *r, int depth) {
    int b = rd_byte(r);
    if (r->bad || depth > 8) return -1;
    const u8 *dummy;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) return 0;
    if ((b >= 0xa0 && b <= 0xbf) || (b >= 0xd9 && b <= 0xdb)) return rd_bytes(r, b, 's', &dummy) < 0 ? -1 : 0;
    if (b >= 0xc4 && b <= 0xc6) return rd_bytes(r, b, 'b', &dummy) < 0 ? -1 : 0;
    if ((b >= 0xca && b <= 0xd3)) {
        static const u8 size[] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
        rd_be(r, size[b - 0xca]);
        return r->bad ? -1 : 0;
    }
    i64 items;
    if (b >= 0x80 && b <= 0x8f) items = 2 * (b & 0xf);
    else if (b >= 0x90 && b <= 0x9f) items = b & 0xf;
    else if (b == 0xdc) items = (i64)rd_be(r, 2);
    else if (b == 0xdd) items = (i64)rd_be(r, 4);
    else if (b == 0xde) items = 2 * (i64)rd_be(r, 2);
    else if (b == 0xdf) items = 2 * (i64)rd_be(r, 4);
    else return -1; /* ext types: Python's */
    for (i64 i = 0; i < items; i++)
        if (rd_skip(r, depth + 1) < 0) return -1;
    return r->bad ? -1 : 0;
}

static int rd_map(struct rd *r, i64 *n) {
    int b = rd_byte(r);
    if (b >= 0x80 && b <= 0x8f) *n = b & 0xf;
    else if (b == 0xde) *n = (i64)rd_be(r, 2);
    else if (b == 0xdf) *n = (i64)rd_be(r, 4);
    else return -1;
    return r->bad ? -1 : 0;
}

static int eq(const u8 *a, i64 n, const char *lit) {
    i64 i = 0;
    for (; i < n && lit[i]; i++)
        if (a[i] != (u8)lit[i]) return 0;
    return i == n && lit[i] == 0;
}

/* ---- replies ---- */

struct out {
    u8 *p, *end;
};

static u8 reply_buf[4 + 1024 + SANDBOX_ID_MAX];

static void put(struct out *o, u8 b) {
    if (o->p < o->end) *o->p++ = b;
}

static void put_str(struct out *o, const char *s, i64 n) {
    if (n < 32) put(o, (u8)(0xa0 | n));
    else if (n < 256) put(o, 0xd9), put(o, (u8)n);
    else put(o, 0xda), put(o, (u8)(n >> 8)), put(o, (u8)n);
    for (i64 i = 0; i < n; i++) put(o, (u8)s[i]);
}

static void put_lit(struct out *o, const char *s) {
    i64 n = 0;
    while (s[n]) n++;
    put_str(o, s, n);
}

static void put_double(struct out *o, double d) {
    union { double d; u64 u; } x = {.d = d};
    put(o, 0xcb);
    for (int i = 7; i >= 0; i--) put(o, (u8)(x.u >> (8 * i)));
}

static void put_bool(struct out *o, int v) { put(o, v ? 0xc3 : 0xc2); }

/* [RESPONSE, id, nil, ...: the caller adds the result */
static void reply_start(struct out *o, const u8 *id, int id_len) {
    o->p = reply_buf + 4;
    o->end = reply_buf + sizeof reply_buf;
    put(o, 0x94);
    put(o, 0x01);
    for (int i = 0; i < id_len; i++) put(o, id[i]);
    put(o, 0xc0);
}

static int write_all(i64 fd, const u8 *p, i64 n) {
    while (n > 0) {
        i64 w = S3(NR_write, fd, p, n);
        if (w == -EINTR) continue;
        if (w <= 0) return -1;
        p += w, n -= w;
    }
    return 0;
}

static int reply_send(i64 fd, struct out *o) {
    if (o->p >= o->end) return -1; /* cannot happen: the buffer holds the largest reply */
    u64 len = (u64)(o->p - reply_buf - 4);
    reply_buf[0] = (u8)(len >> 24), reply_buf[1] = (u8)(len >> 16);
    reply_buf[2] = (u8)(len >> 8), reply_buf[3] = (u8)len;
    return write_all(fd, reply_buf, o->p - reply_buf);
}

static double now(void) {
    struct { i64 sec, nsec; } ts;
    S2(NR_clock_gettime, CLOCK_REALTIME, &ts);
    return (double)ts.sec + (double)ts.nsec / 1e9;
}

/* ---- the methods ---- */

static int ping(i64 fd, const u8 *id, int id_len) {
    struct out o;
    reply_start(&o, id, id_len);
    put(&o, 0x82); /* {"pong": true, "time": <now>} */
    put_lit(&o, "pong"), put_bool(&o, 1);
    put_lit(&o, "time"), put_double(&o, now());
    return reply_send(fd, &o);
}

static u8 rnd_info[8 + MAX_ENTROPY]; /* struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; } */

static int finite(double d) {
    union { double d; u64 u; } x = {.d = d};
    return ((x.u >> 52) & 0x7ff) != 0x7ff;
}

/* 1: answered; 0: Python's (nothing observable was done, or only what Python redoes); -1: write failed. */
static int refresh(struct fk_early *e, struct rd *r, const u8 *id, int id_len) {
    double host_time = 0, tolerance = DEFAULT_CLOCK_TOLERANCE;
    int has_time = 0;
    const u8 *entropy = 0, *hostname = 0, *sid = 0;
    i64 entropy_len = -1, hostname_len = -1, sid_len = -1, n;
    if (rd_map(r, &n) < 0) return 0;
    for (i64 i = 0; i < n; i++) {
        const u8 *key;
        int kb = rd_byte(r);
        i64 kl = rd_bytes(r, kb, 's', &key);
        if (kl < 0) return 0;
        int b = rd_byte(r);
        if (r->bad) return 0;
        if (eq(key, kl, "time")) {
            int got = rd_number(r, b, &host_time);
            if (got < 0) return 0;
            has_time = got;
        } else if (eq(key, kl, "clock_tolerance")) {
            int got = rd_number(r, b, &tolerance);
            if (got < 0) return 0;
            if (!got) tolerance = DEFAULT_CLOCK_TOLERANCE;
        } else if (eq(key, kl, "entropy") || eq(key, kl, "hostname") || eq(key, kl, "sandbox_id")) {
            const u8 **at = key[0] == 'e' ? &entropy : key[0] == 'h' ? &hostname : &sid;
            i64 *len = key[0] == 'e' ? &entropy_len : key[0] == 'h' ? &hostname_len : &sid_len;
            if (b == 0xc0) {
                *len = -1;
                continue;
            }
            *len = rd_bytes(r, b, key[0] == 'e' ? 'b' : 's', at);
            if (*len < 0) return 0;
        } else {
            r->p--; /* unread the value's first byte */
            if (rd_skip(r, 0) < 0) return 0;
        }
    }
    if (r->bad || r->p != r->end) return 0;
    /* identity._parse's checks: a request it would refuse is Python's to refuse. */
    if (has_time && !(finite(host_time) && host_time > 0)) return 0;
    if (!(finite(tolerance) && tolerance >= 0)) return 0;
    if (entropy_len >= 0 && (entropy_len < MIN_ENTROPY || entropy_len > MAX_ENTROPY)) return 0;
    if (hostname_len >= 0) {
        if (hostname_len < 1 || hostname_len > HOSTNAME_MAX) return 0;
        for (i64 i = 0; i < hostname_len; i++)
            if (hostname[i] <= 0x20 || hostname[i] >= 0x7f || hostname[i] == '/') return 0;
        /* An agent that is PID 1 with a writable /etc/hostname rewrites it: Python does that. */
        if (e->etc_hostname) return 0;
    }
    if (sid_len >= 0) {
        if (sid_len < 1 || sid_len > SANDBOX_ID_MAX) return 0;
        for (i64 i = 0; i < sid_len; i++)
            if (sid[i] == 0) return 0;
    }

    /* The steps, in Python's order; any failure is Python's to report (it redoes them all). */
    double skew = 0;
    int clock_set = 0;
    if (has_time) {
        skew = host_time - now();
        if (!(skew <= tolerance && -skew <= tolerance)) {
            struct { i64 sec, nsec; } ts;
            ts.sec = (i64)host_time;
            ts.nsec = (i64)((host_time - (double)ts.sec) * 1e9);
            if (ts.nsec > 999999999) ts.nsec = 999999999;
            if (S2(NR_clock_settime, CLOCK_REALTIME, &ts) < 0) return 0;
            clock_set = 1;
        }
    }
    if (entropy_len >= 0) {
        /* Opened in the parent: a path walk and a close are hundreds of kernel blocks to translate. */
        i64 fd = e->urandom_fd;
        if (fd < 0) return 0;
        int count = (int)(8 * entropy_len), size = (int)entropy_len;
        for (int i = 0; i < 4; i++) rnd_info[i] = (u8)(count >> (8 * i));
        for (int i = 0; i < 4; i++) rnd_info[4 + i] = (u8)(size >> (8 * i));
        for (i64 i = 0; i < entropy_len; i++) rnd_info[8 + i] = entropy[i];
        i64 a = S3(NR_ioctl, fd, RNDADDENTROPY, rnd_info);
        i64 b = a < 0 ? a : S3(NR_ioctl, fd, RNDRESEEDCRNG, 0);
        if (b < 0) return 0;
        for (i64 i = 0; i < entropy_len; i++) e->material[i] = entropy[i];
        e->material_len = entropy_len;
    } else {
        /* Python: os.urandom(64) (blocks until the pool is initialised, as getrandom does) */
        i64 got = 0;
        while (got < 64) {
            i64 k = S3(NR_getrandom, e->material + got, 64 - got, 0);
            if (k == -EINTR) continue;
            if (k <= 0) return 0;
            got += k;
        }
        e->material_len = 64;
    }
    if (hostname_len >= 0 && S2(NR_sethostname, hostname, hostname_len) < 0) return 0;
    if (sid_len >= 0) {
        for (i64 i = 0; i < sid_len; i++) e->sandbox_id[i] = (char)sid[i];
        e->sandbox_id_len = sid_len;
    }
    e->refreshed++;
    char fp[16];
    fingerprint(e->material, e->material_len, fp);

    struct out o;
    reply_start(&o, id, id_len);
    put(&o, 0x87);
    put_lit(&o, "clock");
    if (!has_time) {
        put(&o, 0x82), put_lit(&o, "ok"), put_bool(&o, 1), put_lit(&o, "action"), put_lit(&o, "skipped");
    } else {
        put(&o, 0x83), put_lit(&o, "ok"), put_bool(&o, 1);
        put_lit(&o, "action"), put_lit(&o, clock_set ? "set" : "in_sync");
        put_lit(&o, "skew_s"), put_double(&o, skew);
    }
    put_lit(&o, "kernel_rng");
    put(&o, 0x82), put_lit(&o, "ok"), put_bool(&o, 1);
    put_lit(&o, "action"), put_lit(&o, entropy_len >= 0 ? "reseeded" : "skipped");
    put_lit(&o, "random");
    put(&o, 0x82), put_lit(&o, "ok"), put_bool(&o, 1), put_lit(&o, "numpy"), put_bool(&o, e->numpy != 0);
    put_lit(&o, "random_fingerprint"), put_str(&o, fp, 16);
    put_lit(&o, "hostname");
    if (hostname_len < 0) {
        put(&o, 0x82), put_lit(&o, "ok"), put_bool(&o, 1), put_lit(&o, "action"), put_lit(&o, "skipped");
    } else {
        put(&o, 0x83), put_lit(&o, "ok"), put_bool(&o, 1), put_lit(&o, "action"), put_lit(&o, "set");
        put_lit(&o, "etc_hostname"), put_bool(&o, 0);
    }
    put_lit(&o, "sandbox_id"), put_str(&o, e->sandbox_id, e->sandbox_id_len);
    put_lit(&o, "kernels_reseeded"), put(&o, 0x00);
    return reply_send(e->fd, &o) == 0 ? 1 : -1;
}

/* Answer the frame if it is a ping or a refresh this loop can do: 1; 0: Python's; -1: the host went away. */
static int answer(struct fk_early *e, const u8 *body, i64 size) {
    struct rd r = {body, body + size, 0};
    if (rd_byte(&r) != 0x94 || rd_byte(&r) != 0x00) return 0;
    const u8 *id = r.p;
    int b = rd_byte(&r);
    if (!(b <= 0x7f || (b >= 0xcc && b <= 0xcf))) return 0;
    if (b >= 0xcc) rd_be(&r, 1 << (b - 0xcc));
    int id_len = (int)(r.p - id);
    const u8 *method;
    i64 ml = rd_bytes(&r, rd_byte(&r), 's', &method);
    if (ml < 0 || r.bad) return 0;
    if (r.p < r.end && !((*r.p >= 0x80 && *r.p <= 0x8f) || *r.p == 0xde || *r.p == 0xdf)) return 0;
    if (eq(method, ml, "ping")) {
        if (rd_skip(&r, 0) < 0 || r.p != r.end) return 0;
        return ping(e->fd, id, id_len) == 0 ? 1 : -1;
    }
    if (eq(method, ml, "identity.refresh")) return refresh(e, &r, id, id_len);
    return 0;
}

/* Serve until a frame for Python arrives (then 0, its bytes at buf[0..len)), or
 * -errno when the port fails. The virtio-serial port reads end-of-file while
 * the host end is not connected: then wait and read again. */
__attribute__((visibility("default"))) i64 fk_early_serve(struct fk_early *e) {
    u8 *buf = e->buf;
    i64 have = e->len;
    for (;;) {
        while (have >= 4) {
            i64 size = ((i64)buf[0] << 24) | ((i64)buf[1] << 16) | ((i64)buf[2] << 8) | buf[3];
            if (size > e->cap - 4 || have < 4 + size) break;
            int r = answer(e, buf + 4, size);
            if (r < 0) {
                e->len = have;
                return -32; /* EPIPE: the caller's own write finds out the rest */
            }
            if (r == 0) goto hand_over;
            have -= 4 + size;
            for (i64 i = 0; i < have; i++) buf[i] = buf[4 + size + i];
        }
        if (have >= 4) {
            i64 size = ((i64)buf[0] << 24) | ((i64)buf[1] << 16) | ((i64)buf[2] << 8) | buf[3];
            if (size > e->cap - 4) goto hand_over; /* too big for this buffer: Python reads the rest */
        }
        i64 n = S3(NR_read, e->fd, buf + have, e->cap - have);
        if (n == -EINTR) continue;
        if (n < 0) {
            e->len = have;
            return n;
        }
        if (n == 0) {
            struct { i64 sec, nsec; } pause = {0, 50000000};
            S2(NR_nanosleep, &pause, 0);
            continue;
        }
        have += n;
    }
hand_over:
    e->len = have;
    return 0;
}
