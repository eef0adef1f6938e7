/* udpblast: the bench's UDP load tool (Python cannot flood at line rate).
 *
 *   udpblast send --src IP:PORT --dst IP:PORT --size N --count N --seconds S [--rate PPS]
 *   udpblast recv --bind IP:PORT --seconds S [--idle MS] [--count N]
 *   udpblast echo --bind IP:PORT --seconds S
 *   udpblast rtt  --src IP:PORT --dst IP:PORT --size N --count N --seconds S --rate PPS
 *
 * Every mode is bounded in packets and seconds and prints one JSON line.
 * sendmmsg/recvmmsg move 64 datagrams per system call.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXSIZE 2048

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "udpblast: %s: %s\n", what, strerror(errno));
    exit(1);
}

static struct sockaddr_in parse_addr(const char *text) {
    struct sockaddr_in a = {.sin_family = AF_INET};
    char buf[64];
    snprintf(buf, sizeof buf, "%s", text);
    char *colon = strrchr(buf, ':');
    if (!colon) { fprintf(stderr, "udpblast: bad address %s\n", text); exit(2); }
    *colon = 0;
    a.sin_port = htons(atoi(colon + 1));
    if (inet_pton(AF_INET, buf, &a.sin_addr) != 1) { fprintf(stderr, "udpblast: bad address %s\n", text); exit(2); }
    return a;
}

struct opts {
    const char *mode, *src, *dst, *bind;
    long size, count, idle_ms;
    double seconds, rate;
};

static int open_socket(const char *bind_to) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int one = 1, big = 32 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Root may exceed rmem_max: a deep buffer keeps the receiver from being the loss. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind_to) {
        struct sockaddr_in a = parse_addr(bind_to);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    }
    return fd;
}

/* Sleep until t (absolute, monotonic seconds), spinning only the last few microseconds:
 * a paced sender must leave its CPU to the echo and the sink beside it. */
static void wait_until(double t) {
    double left = t - now();
    if (left > 0.00003) {
        double nap = left - 0.00001;
        struct timespec ts = {(time_t)nap, (long)((nap - (time_t)nap) * 1e9)};
        nanosleep(&ts, NULL);
    }
    while (now() < t) {}
}

static int do_send(struct opts *o) {
    int fd = open_socket(o->src);
    struct sockaddr_in dst = parse_addr(o->dst);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
    static char buf[MAXSIZE];
    memset(buf, 0xab, sizeof buf);
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf;
        iov[i].iov_len = o->size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long batch = BATCH;
    if (o->rate > 0) {  /* paced: one batch every 200 us or so, small enough to keep the rate smooth */
        batch = (long)(o->rate * 0.0002);
        if (batch < 1) batch = 1;
        if (batch > BATCH) batch = BATCH;
    }
    long sent = 0, errors = 0;
    double t0 = now(), end = t0 + o->seconds, t = t0;
    while (sent < o->count && t < end) {
        long n = o->count - sent < batch ? o->count - sent : batch;
        if (o->rate > 0) wait_until(t0 + sent / o->rate);
        int r = sendmmsg(fd, msgs, n, 0);
        if (r < 0) {
            if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED && errno != EINTR) die("sendmmsg");
            errors++;
        } else {
            sent += r;
        }
        t = now();
    }
    printf("{\"mode\": \"send\", \"sent\": %ld, \"errors\": %ld, \"seconds\": %.6f}\n", sent, errors, now() - t0);
    return 0;
}

static int do_recv(struct opts *o, int echo) {
    int fd = open_socket(o->bind);
    struct timeval tv = {0, 20000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static char bufs[BATCH][MAXSIZE];
    struct iovec iov[BATCH];
    struct sockaddr_in from[BATCH];
    struct mmsghdr msgs[BATCH];
    long received = 0, bytes = 0, echoed = 0;
    double t0 = now(), end = t0 + o->seconds, first = 0, last = 0;
    while (now() < end && (o->count <= 0 || received < o->count)) {
        if (received && o->idle_ms > 0 && now() - last > o->idle_ms / 1000.0) break;
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAXSIZE;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int r = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);  /* return what is there, never wait for a full batch */
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            die("recvmmsg");
        }
        last = now();
        if (!received) first = last;
        received += r;
        for (int i = 0; i < r; i++) {
            bytes += msgs[i].msg_len;
            iov[i].iov_len = msgs[i].msg_len;
        }
        if (echo) {
            int s = sendmmsg(fd, msgs, r, 0);
            if (s > 0) echoed += s;
        }
    }
    printf("{\"mode\": \"%s\", \"received\": %ld, \"bytes\": %ld, \"echoed\": %ld, \"window\": %.6f, "
           "\"first\": %.6f, \"seconds\": %.6f}\n", echo ? "echo" : "recv", received, bytes, echoed,
           received ? last - first : 0.0, received ? first - t0 : 0.0, now() - t0);
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, long n, double p) {
    if (!n) return 0;
    long i = (long)(p * (n - 1) + 0.5);
    return v[i];
}

/* Probes carry their sequence number and send time; the echo returns them unchanged. */
static int do_rtt(struct opts *o) {
    int fd = open_socket(o->src);
    struct sockaddr_in dst = parse_addr(o->dst);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
    long size = o->size < 16 ? 16 : o->size;
    double *rtt = calloc(o->count, sizeof(double));
    char *seen = calloc(o->count, 1);
    if (!rtt || !seen) die("calloc");
    char buf[MAXSIZE];
    memset(buf, 0xcd, sizeof buf);
    long sent = 0, got = 0;
    double t0 = now(), end = t0 + o->seconds;
    for (;;) {
        double t = now();
        int sending = sent < o->count && t < end;
        if (!sending && (t > end + 0.5 || got == sent)) break;  /* late replies to a closed socket draw ICMP */
        double due = sending ? t0 + sent / o->rate : t + 0.01;
        struct pollfd p = {fd, POLLIN, 0};
        int ms = (int)((due - t) * 1000);
        if (ms > 0 && poll(&p, 1, ms) < 0 && errno != EINTR) die("poll");
        for (;;) {  /* drain replies without blocking */
            char in[MAXSIZE];
            ssize_t r = recv(fd, in, sizeof in, MSG_DONTWAIT);
            if (r < 16) break;
            int64_t seq;
            double ts;
            memcpy(&seq, in, 8);
            memcpy(&ts, in + 8, 8);
            if (seq >= 0 && seq < o->count && !seen[seq]) {
                seen[seq] = 1;
                rtt[got++] = (now() - ts) * 1e6;
            }
        }
        if (sending && now() >= due) {
            int64_t seq = sent;
            double ts = now();
            memcpy(buf, &seq, 8);
            memcpy(buf + 8, &ts, 8);
            if (send(fd, buf, size, 0) == size || errno == ECONNREFUSED) sent++;
        }
    }
    qsort(rtt, got, sizeof(double), cmp_double);
    printf("{\"mode\": \"rtt\", \"sent\": %ld, \"received\": %ld, \"p50_us\": %.1f, \"p90_us\": %.1f, "
           "\"p99_us\": %.1f, \"min_us\": %.1f, \"max_us\": %.1f, \"seconds\": %.6f}\n", sent, got,
           pct(rtt, got, 0.5), pct(rtt, got, 0.9), pct(rtt, got, 0.99), got ? rtt[0] : 0,
           got ? rtt[got - 1] : 0, now() - t0);
    return 0;
}

int main(int argc, char **argv) {
    struct opts o = {.size = 64, .count = 1000000, .seconds = 2, .idle_ms = 300};
    if (argc < 2) { fprintf(stderr, "usage: udpblast send|recv|echo|rtt [options]\n"); return 2; }
    o.mode = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--src")) o.src = v;
        else if (!strcmp(k, "--dst")) o.dst = v;
        else if (!strcmp(k, "--bind")) o.bind = v;
        else if (!strcmp(k, "--size")) o.size = atol(v);
        else if (!strcmp(k, "--count")) o.count = atol(v);
        else if (!strcmp(k, "--seconds")) o.seconds = atof(v);
        else if (!strcmp(k, "--rate")) o.rate = atof(v);
        else if (!strcmp(k, "--idle")) o.idle_ms = atol(v);
        else { fprintf(stderr, "udpblast: unknown option %s\n", k); return 2; }
    }
    if (o.size < 1 || o.size > MAXSIZE || o.count < 0 || o.seconds <= 0 || o.seconds > 600) {
        fprintf(stderr, "udpblast: size 1..%d, count >= 0, seconds in (0, 600]\n", MAXSIZE);
        return 2;
    }
    prctl(PR_SET_TIMERSLACK, 1UL);  /* pacing wants precise sleeps */
    if (!strcmp(o.mode, "send")) return do_send(&o);
    if (!strcmp(o.mode, "recv")) return do_recv(&o, 0);
    if (!strcmp(o.mode, "echo")) return do_recv(&o, 1);
    if (!strcmp(o.mode, "rtt")) {
        if (o.rate <= 0 || o.count > 10000000) { fprintf(stderr, "udpblast: rtt needs --rate > 0\n"); return 2; }
        return do_rtt(&o);
    }
    fprintf(stderr, "udpblast: unknown mode %s\n", o.mode);
    return 2;
}
