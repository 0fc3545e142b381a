/*
 * dve_io: the Linux I/O calls Node's fs lacks, plus batched positional I/O.
 *
 * submit() runs a batch of ops sequentially in ONE libuv threadpool job and
 * calls done() once on the JS thread. The op descriptors (opcodes, fds,
 * offsets, lengths) are copied at submit time, so the caller may reuse those
 * arrays as soon as submit() returns; results are copied into the caller's
 * Float64Array just before done() runs. Buffers and results/done are kept
 * alive by references until completion.
 *
 * Worker-side failures never throw: they are reported as -errno results.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_SAFE_INTEGER 9007199254740991.0
#define MAX_BATCH 0x1000000u /* 16M ops per submit: a sanity cap on malloc size */

enum {
  OP_READ = 0, OP_WRITE, OP_FDATASYNC, OP_PUNCH_HOLE, OP_ZERO_RANGE,
  OP_SEEK_DATA, OP_SEEK_HOLE, OP_BLKDISCARD, OP_BLKZEROOUT
};

typedef struct {
  double offset, length, result;
  uint8_t *buf;
  size_t buflen;
  int32_t fd;
  uint8_t opcode;
  uint8_t has_buf;
} io_op;

typedef struct {
  napi_async_work work;
  napi_ref results_ref, done_ref, holder_ref;
  uint32_t count;
  io_op ops[];
} io_batch;

#define EINTR_LOOP(r, expr) do { (r) = (expr); } while ((r) < 0 && errno == EINTR)

static int is_safe_uint(double v) {
  return isfinite(v) && v >= 0 && v <= MAX_SAFE_INTEGER && floor(v) == v;
}

/* ---------------------------------------------------------------- syscalls */

static int do_fallocate(int fd, int mode, double off, double len) {
  int r;
  if (len == 0) return 0; /* fallocate rejects len 0; treat as a no-op */
  EINTR_LOOP(r, fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len));
  return r < 0 ? -errno : 0;
}

/* Returns the resulting offset; -1 on ENXIO (no data/hole at or after offset);
 * on any other error returns -errno and sets *err = errno (else *err = 0). */
static double do_seek(int fd, double off, int whence, int *err) {
  off_t r = lseek(fd, (off_t)off, whence);
  *err = 0;
  if (r >= 0) return (double)r;
  if (errno == ENXIO) return -1;
  *err = errno;
  return -(double)errno;
}

static int do_blkrange(int fd, unsigned long req, double off, double len) {
  uint64_t range[2] = { (uint64_t)off, (uint64_t)len };
  int r;
  if (len == 0) return 0;
  EINTR_LOOP(r, ioctl(fd, req, range));
  return r < 0 ? -errno : 0;
}

static double do_rw(io_op *op, int is_write) {
  size_t len, done = 0;
  off_t off = (off_t)op->offset;
  if (!op->has_buf || op->length > (double)op->buflen) return -EINVAL;
  len = (size_t)op->length;
  while (done < len) {
    ssize_t n;
    if (is_write) n = pwrite(op->fd, op->buf + done, len - done, off + (off_t)done);
    else n = pread(op->fd, op->buf + done, len - done, off + (off_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -(double)errno;
    }
    if (n == 0) {
      if (is_write) return -EIO;
      memset(op->buf + done, 0, len - done); /* EOF: zero-fill the rest */
      break;
    }
    done += (size_t)n;
  }
  return (double)len;
}

static double run_op(io_op *op) {
  int r, err;
  if (!is_safe_uint(op->offset) || !is_safe_uint(op->length)) return -EINVAL;
  switch (op->opcode) {
  case OP_READ: return do_rw(op, 0);
  case OP_WRITE: return do_rw(op, 1);
  case OP_FDATASYNC:
    EINTR_LOOP(r, fdatasync(op->fd));
    return r < 0 ? -(double)errno : 0;
  case OP_PUNCH_HOLE:
    return do_fallocate(op->fd, FALLOC_FL_PUNCH_HOLE, op->offset, op->length);
  case OP_ZERO_RANGE:
    return do_fallocate(op->fd, FALLOC_FL_ZERO_RANGE, op->offset, op->length);
  case OP_SEEK_DATA: return do_seek(op->fd, op->offset, SEEK_DATA, &err);
  case OP_SEEK_HOLE: return do_seek(op->fd, op->offset, SEEK_HOLE, &err);
  case OP_BLKDISCARD: return do_blkrange(op->fd, BLKDISCARD, op->offset, op->length);
  case OP_BLKZEROOUT: return do_blkrange(op->fd, BLKZEROOUT, op->offset, op->length);
  default: return -EINVAL;
  }
}

/* ------------------------------------------------------------ JS helpers */

static const char *errno_name(int e) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char *n = strerrorname_np(e);
  if (n) return n;
#endif
  switch (e) {
  case EPERM: return "EPERM";   case ENOENT: return "ENOENT"; case EIO: return "EIO";
  case ENXIO: return "ENXIO";   case EBADF: return "EBADF";   case EINVAL: return "EINVAL";
  case ENOTTY: return "ENOTTY"; case ENOSPC: return "ENOSPC"; case ESPIPE: return "ESPIPE";
  case EROFS: return "EROFS";   case ENOSYS: return "ENOSYS"; case EOPNOTSUPP: return "EOPNOTSUPP";
  default: return "EUNKNOWN";
  }
}

/* Throws an Error like Node's fs errors: .code 'EOPNOTSUPP', .errno -95, .syscall. */
static void throw_errno(napi_env env, int err, const char *syscall) {
  char msg[192];
  const char *code = errno_name(err);
  napi_value m, c, e, n, s;
  snprintf(msg, sizeof msg, "%s: %s, %s", code, strerror(err), syscall);
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m) != napi_ok ||
      napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &c) != napi_ok ||
      napi_create_error(env, c, m, &e) != napi_ok ||
      napi_create_int32(env, -err, &n) != napi_ok ||
      napi_set_named_property(env, e, "errno", n) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &s) != napi_ok ||
      napi_set_named_property(env, e, "syscall", s) != napi_ok ||
      napi_throw(env, e) != napi_ok)
    napi_throw_error(env, code, msg);
}

static int type_error(napi_env env, const char *name, const char *what) {
  char msg[192];
  snprintf(msg, sizeof msg, "The \"%s\" argument must be %s", name, what);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return 0;
}

static int get_number(napi_env env, napi_value v, double *out) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && t == napi_number &&
         napi_get_value_double(env, v, out) == napi_ok;
}

static int get_fd(napi_env env, napi_value v, const char *name, int32_t *out) {
  double d;
  if (!get_number(env, v, &d) || !(d >= 0 && d <= INT32_MAX) || floor(d) != d)
    return type_error(env, name, "a non-negative int32 file descriptor");
  *out = (int32_t)d;
  return 1;
}

static int get_u53(napi_env env, napi_value v, const char *name, double *out) {
  if (!get_number(env, v, out) || !is_safe_uint(*out))
    return type_error(env, name, "a non-negative safe integer");
  return 1;
}

static int get_typed(napi_env env, napi_value v, napi_typedarray_type want, const char *name,
                     const char *what, uint32_t min_len, void **data) {
  bool is;
  napi_typedarray_type type;
  size_t len;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, &len, data, NULL, NULL) != napi_ok ||
      type != want || len < min_len)
    return type_error(env, name, what);
  return 1;
}

/* Missing arguments come back as undefined, so validation names them. */
static int get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    napi_throw_error(env, NULL, "dve_io: napi_get_cb_info failed");
    return 0;
  }
  return 1;
}

/* ------------------------------------------------------------------ submit */

static void batch_execute(napi_env env, void *data) {
  io_batch *b = data;
  for (uint32_t i = 0; i < b->count; i++) b->ops[i].result = run_op(&b->ops[i]);
}

static void batch_free(napi_env env, io_batch *b) {
  if (b->results_ref) napi_delete_reference(env, b->results_ref);
  if (b->done_ref) napi_delete_reference(env, b->done_ref);
  if (b->holder_ref) napi_delete_reference(env, b->holder_ref);
  if (b->work) napi_delete_async_work(env, b->work);
  free(b);
}

static void batch_complete(napi_env env, napi_status status, void *data) {
  io_batch *b = data;
  napi_value results, done = NULL, undef, ignored;
  napi_typedarray_type type;
  size_t len;
  void *out;
  if (napi_get_reference_value(env, b->results_ref, &results) == napi_ok && results &&
      napi_get_typedarray_info(env, results, &type, &len, &out, NULL, NULL) == napi_ok &&
      type == napi_float64_array && len >= b->count && out) {
    double *res = out;
    for (uint32_t i = 0; i < b->count; i++)
      res[i] = status == napi_ok ? b->ops[i].result : -(double)ECANCELED;
  }
  if (napi_get_reference_value(env, b->done_ref, &done) != napi_ok) done = NULL;
  batch_free(env, b);
  if (done && napi_get_undefined(env, &undef) == napi_ok)
    napi_call_function(env, undef, done, 0, NULL, &ignored); /* a throw in done() is uncaught, as for fs callbacks */
}

static napi_value js_submit(napi_env env, napi_callback_info info) {
  napi_value argv[8], holder, name;
  double dcount;
  uint32_t count, blen;
  uint8_t *opcodes;
  int32_t *fds;
  double *offsets, *lengths, *results;
  bool is_array;
  napi_valuetype t;
  io_batch *b;

  if (!get_args(env, info, 8, argv)) return NULL;
  if (!get_number(env, argv[0], &dcount) || !(dcount >= 0 && dcount <= MAX_BATCH) ||
      floor(dcount) != dcount) {
    type_error(env, "count", "an integer between 0 and 16777216");
    return NULL;
  }
  count = (uint32_t)dcount;
  if (!get_typed(env, argv[1], napi_uint8_array, "opcodes", "a Uint8Array of at least count elements",
                 count, (void **)&opcodes) ||
      !get_typed(env, argv[2], napi_int32_array, "fds", "an Int32Array of at least count elements",
                 count, (void **)&fds) ||
      !get_typed(env, argv[3], napi_float64_array, "offsets", "a Float64Array of at least count elements",
                 count, (void **)&offsets) ||
      !get_typed(env, argv[4], napi_float64_array, "lengths", "a Float64Array of at least count elements",
                 count, (void **)&lengths))
    return NULL;
  if (napi_is_array(env, argv[5], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[5], &blen) != napi_ok || blen < count) {
    type_error(env, "buffers", "an Array of at least count elements");
    return NULL;
  }
  if (!get_typed(env, argv[6], napi_float64_array, "results", "a Float64Array of at least count elements",
                 count, (void **)&results))
    return NULL;
  if (napi_typeof(env, argv[7], &t) != napi_ok || t != napi_function) {
    type_error(env, "done", "a function");
    return NULL;
  }

  b = calloc(1, sizeof(io_batch) + (size_t)count * sizeof(io_op));
  if (!b) {
    napi_throw_error(env, "ENOMEM", "dve_io: out of memory");
    return NULL;
  }
  b->count = count;
  if (napi_create_array_with_length(env, count, &holder) != napi_ok) goto fail;
  for (uint32_t i = 0; i < count; i++) {
    io_op *op = &b->ops[i];
    op->opcode = opcodes[i];
    op->fd = fds[i];
    op->offset = offsets[i];
    op->length = lengths[i];
    if (op->opcode == OP_READ || op->opcode == OP_WRITE) {
      napi_value buf;
      bool is_buf = false;
      void *p = NULL;
      size_t n = 0;
      if (napi_get_element(env, argv[5], i, &buf) != napi_ok) goto fail;
      if (napi_is_buffer(env, buf, &is_buf) != napi_ok) goto fail;
      if (is_buf) {
        if (napi_get_buffer_info(env, buf, &p, &n) != napi_ok) goto fail;
        if (napi_set_element(env, holder, i, buf) != napi_ok) goto fail;
        op->buf = p;
        op->buflen = n;
        op->has_buf = 1;
      }
    }
  }
  if (napi_create_reference(env, holder, 1, &b->holder_ref) != napi_ok ||
      napi_create_reference(env, argv[6], 1, &b->results_ref) != napi_ok ||
      napi_create_reference(env, argv[7], 1, &b->done_ref) != napi_ok ||
      napi_create_string_utf8(env, "dve_io.submit", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, batch_execute, batch_complete, b, &b->work) != napi_ok ||
      napi_queue_async_work(env, b->work) != napi_ok)
    goto fail;
  return NULL;

fail:
  batch_free(env, b);
  {
    bool pending = false;
    if (napi_is_exception_pending(env, &pending) != napi_ok || !pending)
      napi_throw_error(env, NULL, "dve_io.submit: N-API call failed");
  }
  return NULL;
}

/* ------------------------------------------------------- sync functions */

static napi_value fallocate_sync(napi_env env, napi_callback_info info, int mode) {
  napi_value argv[3];
  int32_t fd;
  double off, len;
  int r;
  if (!get_args(env, info, 3, argv) || !get_fd(env, argv[0], "fd", &fd) ||
      !get_u53(env, argv[1], "offset", &off) || !get_u53(env, argv[2], "length", &len))
    return NULL;
  r = do_fallocate(fd, mode, off, len);
  if (r < 0) throw_errno(env, -r, "fallocate");
  return NULL;
}

static napi_value js_punch_hole(napi_env env, napi_callback_info info) {
  return fallocate_sync(env, info, FALLOC_FL_PUNCH_HOLE);
}

static napi_value js_zero_range(napi_env env, napi_callback_info info) {
  return fallocate_sync(env, info, FALLOC_FL_ZERO_RANGE);
}

static napi_value seek_sync(napi_env env, napi_callback_info info, int whence) {
  napi_value argv[2], out;
  int32_t fd;
  double off, r;
  int err;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], "fd", &fd) ||
      !get_u53(env, argv[1], "offset", &off))
    return NULL;
  r = do_seek(fd, off, whence, &err);
  if (err) {
    throw_errno(env, err, "lseek");
    return NULL;
  }
  if (napi_create_double(env, r, &out) != napi_ok) return NULL;
  return out;
}

static napi_value js_seek_data(napi_env env, napi_callback_info info) {
  return seek_sync(env, info, SEEK_DATA);
}

static napi_value js_seek_hole(napi_env env, napi_callback_info info) {
  return seek_sync(env, info, SEEK_HOLE);
}

static napi_value js_block_device_size(napi_env env, napi_callback_info info) {
  napi_value argv[1], out;
  int32_t fd;
  uint64_t size = 0;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], "fd", &fd)) return NULL;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
    throw_errno(env, errno, "ioctl(BLKGETSIZE64)");
    return NULL;
  }
  if (napi_create_double(env, (double)size, &out) != napi_ok) return NULL;
  return out;
}

static napi_value js_is_block_device(napi_env env, napi_callback_info info) {
  napi_value argv[1], out;
  int32_t fd;
  struct stat st;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], "fd", &fd)) return NULL;
  if (fstat(fd, &st) < 0) {
    throw_errno(env, errno, "fstat");
    return NULL;
  }
  if (napi_get_boolean(env, S_ISBLK(st.st_mode), &out) != napi_ok) return NULL;
  return out;
}

/* ------------------------------------------------------------ try-now I/O */

/*
 * tryReadNow / tryWriteNow: one positional read or write on the JS thread with
 * RWF_NOWAIT, so it succeeds only if it needs no blocking I/O (the pages are in the
 * page cache; for writes, the filesystem can take them without waiting). On
 * -EAGAIN (or a partial transfer, also reported as -EAGAIN) the caller redoes the
 * whole op on the thread pool. This saves the thread hand-off for the common case,
 * which costs more than a cached 4 KiB copy. Returns the length, or -errno.
 */
static napi_value try_now(napi_env env, napi_callback_info info, int is_write) {
  napi_value argv[4], out;
  int32_t fd;
  double off, len;
  void *data;
  size_t buflen;
  double result;
  if (!get_args(env, info, 4, argv) || !get_fd(env, argv[0], "fd", &fd)) return NULL;
  if (napi_get_buffer_info(env, argv[1], &data, &buflen) != napi_ok) {
    type_error(env, "buffer", "a Buffer");
    return NULL;
  }
  if (!get_u53(env, argv[2], "offset", &off) || !get_u53(env, argv[3], "length", &len)) return NULL;
  if (len > (double)buflen) {
    result = -EINVAL;
  } else {
    struct iovec iov = { data, (size_t)len };
    ssize_t n;
    do {
      n = is_write ? pwritev2(fd, &iov, 1, (off_t)off, RWF_NOWAIT)
                   : preadv2(fd, &iov, 1, (off_t)off, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) result = -(double)errno;
    else if ((size_t)n == iov.iov_len) result = len;
    else if (!is_write && n == 0 && iov.iov_len > 0) {
      memset(data, 0, iov.iov_len); /* at EOF: reads as zeros */
      result = len;
    } else result = -EAGAIN; /* partial: let the pool finish it */
  }
  if (napi_create_double(env, result, &out) != napi_ok) return NULL;
  return out;
}

static napi_value js_try_read_now(napi_env env, napi_callback_info info) {
  return try_now(env, info, 0);
}

static napi_value js_try_write_now(napi_env env, napi_callback_info info) {
  return try_now(env, info, 1);
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
    { "submit", NULL, js_submit, NULL, NULL, NULL, napi_enumerable, NULL },
    { "punchHole", NULL, js_punch_hole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "zeroRange", NULL, js_zero_range, NULL, NULL, NULL, napi_enumerable, NULL },
    { "seekData", NULL, js_seek_data, NULL, NULL, NULL, napi_enumerable, NULL },
    { "seekHole", NULL, js_seek_hole, NULL, NULL, NULL, napi_enumerable, NULL },
    { "blockDeviceSize", NULL, js_block_device_size, NULL, NULL, NULL, napi_enumerable, NULL },
    { "isBlockDevice", NULL, js_is_block_device, NULL, NULL, NULL, napi_enumerable, NULL },
    { "tryReadNow", NULL, js_try_read_now, NULL, NULL, NULL, napi_enumerable, NULL },
    { "tryWriteNow", NULL, js_try_write_now, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok)
    return NULL;
  return exports;
}
