/* Guest-side vsock helper for crates/cli/tests/vsock_e2e.rs (the guest's busybox has
 * no vsock support). Built on the host with `gcc -static` and handed to the guest on a
 * raw disk.
 *
 *   vsock_helper listen PORT         accept one connection, echo it until EOF, exit 0
 *   vsock_helper send CID PORT MSG   connect, send MSG and a newline, half-close,
 *                                    print what comes back, exit 0
 *
 * Progress goes to stdout as `vsock-helper: ...` lines (the test waits for them);
 * failures go to stderr as `vsock-helper: error: ...` and exit 1.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *what) {
    fprintf(stderr, "vsock-helper: error: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static struct sockaddr_vm addr(unsigned cid, unsigned port) {
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

static int listen_echo(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_vm a = addr(VMADDR_CID_ANY, port);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(s, 1) < 0)
        die("listen");
    printf("vsock-helper: listening on port %u\n", port);
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    if (c < 0)
        die("accept");
    char buf[16384];
    unsigned long total = 0;
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* The host closing the stream may arrive as a reset. */
            if (errno == ECONNRESET)
                break;
            die("read");
        }
        if (write_all(c, buf, (size_t)n) < 0)
            die("write");
        total += (unsigned long)n;
    }
    close(c);
    close(s);
    printf("vsock-helper: echoed %lu bytes\n", total);
    return 0;
}

static int send_line(unsigned cid, unsigned port, const char *msg) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_vm a = addr(cid, port);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    if (write_all(s, msg, strlen(msg)) < 0 || write_all(s, "\n", 1) < 0)
        die("write");
    if (shutdown(s, SHUT_WR) < 0)
        die("shutdown");
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(s, buf + len, sizeof buf - 1 - len);
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        len += (size_t)n;
        if (len == sizeof buf - 1)
            break;
    }
    buf[len] = '\0';
    while (len > 0 && buf[len - 1] == '\n')
        buf[--len] = '\0';
    close(s);
    printf("vsock-helper: reply %s\n", buf);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "listen") == 0)
        return listen_echo((unsigned)strtoul(argv[2], NULL, 10));
    if (argc == 5 && strcmp(argv[1], "send") == 0)
        return send_line((unsigned)strtoul(argv[2], NULL, 10),
                         (unsigned)strtoul(argv[3], NULL, 10), argv[4]);
    fprintf(stderr, "usage: vsock_helper listen PORT | send CID PORT MSG\n");
    return 2;
}
