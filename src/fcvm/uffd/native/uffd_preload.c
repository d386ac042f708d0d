/*
 * LD_PRELOAD library that hands a QEMU guest's RAM to fcvm's userfaultfd page server, the way
 * Firecracker does for a snapshot restored with the `Uffd` memory backend.
 *
 * Configured by environment variables, read once at load and then removed from the environment so that
 * processes QEMU spawns (e.g. `exec:cat` for migrate-incoming) never act on them:
 *   FCVM_UFFD_SOCKET    the page server's Unix socket; unset, with no FCVM_UFFD_SOCKET_FD, the library does nothing
 *   FCVM_UFFD_SOCKET_FD instead of FCVM_UFFD_SOCKET: an inherited socket already connected to the page server
 *   FCVM_UFFD_DEV_FD    optional: an inherited fd open on /dev/userfaultfd
 *   FCVM_UFFD_MEM_SIZE  the guest RAM size in bytes (the memory-backend-ram `size`)
 * The two inherited fds are how an unprivileged QEMU gets what it may not open itself (the socket sits in the
 * snapshot's owner-only directory, /dev/userfaultfd is root's): its launcher opens them and QEMU inherits them.
 *
 * Fail closed: once configured, any error prints one line naming the step and calls _exit(1). A restored
 * VM whose RAM the server does not back reads zero-filled pages and runs on as a corrupted clone; dying
 * is always better. A mapping that never matches cannot be detected here (the library cannot know
 * which mmap will be the last), so the launcher checks that QEMU holds a userfaultfd before it restores.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define TAG "fcvm-uffd-preload: "

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

/* glibc on 64-bit: off_t is 64 bits and mmap64 is the same function as mmap. */
_Static_assert(sizeof(off_t) == 8, "mmap and mmap64 must share one signature");

static mmap_fn real_mmap;
static struct sockaddr_un server_addr;
static int server_fd = -1; /* FCVM_UFFD_SOCKET_FD: connected by the launcher */
static int device_fd = -1; /* FCVM_UFFD_DEV_FD: /dev/userfaultfd, opened by the launcher */
static size_t ram_bytes; /* 0 until configured: every mmap passes straight through */
static int ram_claimed;  /* set by the one mapping handed to the server */

static void die(const char *step, int err)
{
	char line[512];
	int n = snprintf(line, sizeof line, TAG "%s: %s; exiting so the VM never runs on zero-filled memory\n",
			 step, err ? strerror(err) : "invalid");
	if (n > 0)
		(void)!write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
	_exit(1);
}

/* Lazy as well as in the constructor: other libraries' constructors may map memory before ours runs. */
static mmap_fn next_mmap(void)
{
	mmap_fn fn = __atomic_load_n(&real_mmap, __ATOMIC_ACQUIRE);
	if (!fn) {
		fn = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
		if (!fn)
			die("dlsym(mmap)", 0);
		__atomic_store_n(&real_mmap, fn, __ATOMIC_RELEASE);
	}
	return fn;
}

/* QEMU is started through wrappers (nsenter into the VM's namespaces): they must pass the configuration on
 * untouched, so only the named program takes it. */
static int is_target_program(void)
{
	const char *program = getenv("FCVM_UFFD_PROGRAM");
	if (!program)
		return 1;
	char exe[4096];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n < 0)
		die("readlink(/proc/self/exe)", errno);
	exe[n] = 0;
	const char *base = strrchr(exe, '/');
	return strcmp(base ? base + 1 : exe, program) == 0;
}

/* The fd named by variable `name`, or -1 when it is unset; it stays open but is not passed to QEMU's children. */
static int inherited_fd(const char *name, const char *complaint)
{
	const char *text = getenv(name);
	if (!text)
		return -1;
	char *end;
	errno = 0;
	long fd = strtol(text, &end, 10);
	if (errno || end == text || *end || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_SETFD, FD_CLOEXEC) < 0)
		die(complaint, 0);
	return (int)fd;
}

__attribute__((constructor)) static void configure(void)
{
	next_mmap();
	const char *socket_path = getenv("FCVM_UFFD_SOCKET");
	const char *size_text = getenv("FCVM_UFFD_MEM_SIZE");
	if ((!socket_path && !getenv("FCVM_UFFD_SOCKET_FD")) || !is_target_program())
		return;
	server_fd = inherited_fd("FCVM_UFFD_SOCKET_FD", "FCVM_UFFD_SOCKET_FD must be an open file descriptor");
	device_fd = inherited_fd("FCVM_UFFD_DEV_FD", "FCVM_UFFD_DEV_FD must be an open file descriptor");
	if (server_fd < 0 && (!*socket_path || strlen(socket_path) >= sizeof server_addr.sun_path))
		die("FCVM_UFFD_SOCKET must be a socket path shorter than 108 bytes", 0);
	char *end;
	errno = 0;
	unsigned long long size = size_text ? strtoull(size_text, &end, 10) : 0;
	long page = sysconf(_SC_PAGESIZE);
	if (!size_text || errno || end == size_text || *end || size == 0 || size % (unsigned long long)page)
		die("FCVM_UFFD_MEM_SIZE must be the guest RAM size in bytes, a multiple of the page size", 0);
	if (server_fd < 0) {
		server_addr.sun_family = AF_UNIX;
		strcpy(server_addr.sun_path, socket_path);
	}
	ram_bytes = (size_t)size;
	unsetenv("FCVM_UFFD_SOCKET");
	unsetenv("FCVM_UFFD_SOCKET_FD");
	unsetenv("FCVM_UFFD_DEV_FD");
	unsetenv("FCVM_UFFD_MEM_SIZE");
	unsetenv("FCVM_UFFD_PROGRAM");
}

/*
 * Guest RAM, as QEMU 7.2 maps a memory-backend-ram of N bytes (qemu_ram_mmap):
 *   mmap(NULL, N + 2 MiB, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)          reservation, no match
 *   mmap(R, N, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_FIXED|MAP_ANONYMOUS, -1, 0)  the RAM itself
 * MAP_NORESERVE is added for `reserve=off`. Anything else (MAP_SHARED file RAM, hugetlbfs, ROM blocks of
 * other sizes, thread stacks, malloc arenas) must not match: registering the wrong range would leave the
 * real RAM zero-filled behind a page server that believes it is serving it.
 */
static int is_guest_ram(size_t length, int prot, int flags, int fd)
{
	const int required = MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS;
	return ram_bytes && length == ram_bytes && fd == -1 && prot == (PROT_READ | PROT_WRITE) &&
	       (flags & ~MAP_NORESERVE) == required;
}

/* /dev/userfaultfd (what Firecracker uses; an unprivileged QEMU is handed it open), else the syscall. */
static int new_userfaultfd(void)
{
	const int flags = O_CLOEXEC | O_NONBLOCK;
	int dev = device_fd >= 0 ? device_fd : open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	device_fd = -1;
	if (dev >= 0) {
		int uffd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
		close(dev);
		if (uffd >= 0)
			return uffd;
	}
	return (int)syscall(SYS_userfaultfd, flags);
}

/* Firecracker's handshake: one JSON array of regions plus the uffd by SCM_RIGHTS, in one sendmsg. */
static void send_handshake(int uffd, void *base, size_t length)
{
	char json[256];
	long page = sysconf(_SC_PAGESIZE);
	/* page_size_kib holds bytes too: Firecracker still sends it for page servers written before page_size. */
	int n = snprintf(json, sizeof json,
			 "[{\"base_host_virt_addr\":%lu,\"size\":%zu,\"offset\":0,\"page_size\":%ld,\"page_size_kib\":%ld}]",
			 (unsigned long)(uintptr_t)base, length, page, page);
	int sock = server_fd >= 0 ? server_fd : socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die("socket", errno);
	if (server_fd < 0 && connect(sock, (struct sockaddr *)&server_addr, sizeof server_addr) < 0) {
		int err = errno;
		char step[160];
		snprintf(step, sizeof step, "connect to the page server at %s", server_addr.sun_path);
		die(step, err);
	}

	union {
		struct cmsghdr header;
		char space[CMSG_SPACE(sizeof(int))];
	} control = { 0 };
	struct iovec iov = { .iov_base = json, .iov_len = (size_t)n };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = control.space, .msg_controllen = sizeof control.space };
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &uffd, sizeof(int));
	ssize_t sent;
	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	if (sent < 0)
		die("send the handshake to the page server", errno);
	if (sent != n) /* a stream socket could split it; the fd went with the first part, so resending is wrong */
		die("send the handshake to the page server (short write)", 0);
	/* Like Firecracker, keep the socket open: the server treats its closing as the VM going away. */
}

static void hand_to_page_server(void *base, size_t length)
{
	int uffd = new_userfaultfd();
	if (uffd < 0)
		die("userfaultfd (needs root, access to /dev/userfaultfd or vm.unprivileged_userfaultfd=1)", errno);
	/* The server relies on REMOVE events: without them a page QEMU discards (balloon, madvise) would be
	 * refilled from the snapshot instead of reading as zeros. Kernels since 4.11 grant it. */
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE };
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE", errno);
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)base, .len = length },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		die("UFFDIO_REGISTER of guest RAM", errno);
	const uint64_t needed = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE);
	if ((reg.ioctls & needed) != needed)
		die("UFFDIO_REGISTER of guest RAM (no UFFDIO_COPY/UFFDIO_ZEROPAGE on it)", 0);
	send_handshake(uffd, base, length);
	/* The uffd stays open for QEMU's lifetime: closing it would let faults fill with zeros. */
}

static void *map(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	void *mapped = next_mmap()(addr, length, prot, flags, fd, offset);
	if (mapped != MAP_FAILED && is_guest_ram(length, prot, flags, fd) &&
	    !__atomic_exchange_n(&ram_claimed, 1, __ATOMIC_ACQ_REL))
		hand_to_page_server(mapped, length);
	return mapped;
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	return map(addr, length, prot, flags, fd, offset);
}

/* QEMU is built with _FILE_OFFSET_BITS=64 and so imports mmap64, not mmap. */
void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	return map(addr, length, prot, flags, fd, offset);
}
