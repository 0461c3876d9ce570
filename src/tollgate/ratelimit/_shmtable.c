/*
 * The shared-memory store's primitives in C: stripe locks, record reads and writes, and whole
 * single-limit requests.
 *
 * `tollgate.ratelimit.shm` keeps rate-limit states in a file every worker maps. In Python,
 * locking a stripe is two fcntl system calls, and reading or writing a 64-byte record goes
 * through struct and zlib: together about five microseconds per request, more than the rest of
 * the rate-limit policy. No library offers these pieces, so they are written here:
 *
 * - stripe locks are process-shared, robust pthread mutexes living in the mapped file. An
 *   uncontended lock is an atomic instruction, no system call. Robust: when a holder dies, the
 *   kernel hands the mutex to the next locker with EOWNERDEAD, which marks it consistent and
 *   goes on (the records it guards carry CRCs, so a torn record is detected by the reader, as
 *   with the fcntl locks this replaces);
 * - `find` (lock a stripe, find a key's record, read its fields) and `save` (write a record,
 *   unlock) do a request's whole table work in two calls; records carry a CRC-32 (the same
 *   polynomial and result as zlib.crc32, so the pure-Python code reads what this writes);
 * - `hit` does a whole single-limit request in one call: lock, find, decide, write, unlock.
 *   Deciding is `tollgate.ratelimit.algorithms` again, operation for operation (see "Deciding"
 *   below), so that its decisions and the states it writes are the pure algorithms' bit for
 *   bit; anything it cannot decide exactly it hands back to Python.
 *
 * The record layout is the one shm.py documents (little-endian): digest (16), tag (1),
 * padding (7), three 8-byte fields, expiry (float64), CRC-32 of bytes 0-55, padding (4).
 * Field layouts are strings of three codes: 'd' float64, 'q' int64, 'x' unused (zero).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the shared-memory record layout is little-endian"
#endif

#define RECORD_SIZE 64
#define DIGEST_SIZE 16
#define TAG_AT 16
#define FIELDS_AT 24
#define EXPIRES_AT 48
#define CRC_AT 56
#define LOCK_TIMEOUT_SECONDS 5
#define COUNTER_SIZE 64
#define COUNTER_CRC_AT 8
#define MUTEX_AT 16

/* CRC-32 (zlib's) by slicing-by-8: eight bytes per step through eight tables, so that the two
 * CRCs of a request's record (checked on the read, made on the write) cost a few tens of
 * nanoseconds rather than a byte-at-a-time loop's hundred and more. */
static uint32_t crc_tables[8][256];

static void make_crc_tables(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_tables[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        for (int k = 1; k < 8; k++) {
            uint32_t c = crc_tables[k - 1][n];
            crc_tables[k][n] = (c >> 8) ^ crc_tables[0][c & 0xFF];
        }
    }
}

static uint32_t crc32_of(const unsigned char *data, size_t length) {
    uint32_t c = 0xFFFFFFFFu;
    while (length >= 8) {
        uint32_t one, two;
        memcpy(&one, data, 4);
        memcpy(&two, data + 4, 4);
        one ^= c;
        c = crc_tables[7][one & 0xFF] ^ crc_tables[6][(one >> 8) & 0xFF] ^
            crc_tables[5][(one >> 16) & 0xFF] ^ crc_tables[4][one >> 24] ^
            crc_tables[3][two & 0xFF] ^ crc_tables[2][(two >> 8) & 0xFF] ^
            crc_tables[1][(two >> 16) & 0xFF] ^ crc_tables[0][two >> 24];
        data += 8;
        length -= 8;
    }
    while (length--) {
        c = crc_tables[0][(c ^ *data++) & 0xFF] ^ (c >> 8);
    }
    return c ^ 0xFFFFFFFFu;
}

/* The writable bytes of `object` (the store's mmap), checked to hold [at, at + size). */
static int get_span(PyObject *object, Py_buffer *view, Py_ssize_t at, Py_ssize_t size) {
    if (PyObject_GetBuffer(object, view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (at < 0 || size < 0 || at > view->len - size) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_IndexError, "bytes %zd-%zd are outside the map", at, at + size);
        return -1;
    }
    return 0;
}

static PyObject *mutex_size(PyObject *module, PyObject *unused) {
    return PyLong_FromSize_t(sizeof(pthread_mutex_t));
}

/* init_locks(map, first, stride, count): a robust, process-shared mutex at each offset. */
static PyObject *init_locks(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "init_locks(map, first, stride, count)");
        return NULL;
    }
    Py_ssize_t first = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stride = PyLong_AsSsize_t(args[2]);
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (stride < (Py_ssize_t)sizeof(pthread_mutex_t) || count < 0) {
        PyErr_SetString(PyExc_ValueError, "a lock needs a stride of at least one mutex");
        return NULL;
    }
    Py_buffer view;
    if (get_span(args[0], &view, first, stride * count) < 0) {
        return NULL;
    }
    pthread_mutexattr_t attributes;
    int error = pthread_mutexattr_init(&attributes);
    if (!error) error = pthread_mutexattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
    if (!error) error = pthread_mutexattr_setrobust(&attributes, PTHREAD_MUTEX_ROBUST);
    for (Py_ssize_t i = 0; !error && i < count; i++) {
        pthread_mutex_t *mutex = (pthread_mutex_t *)((char *)view.buf + first + i * stride);
        error = pthread_mutex_init(mutex, &attributes);
    }
    pthread_mutexattr_destroy(&attributes);
    PyBuffer_Release(&view);
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* Lock `mutex`; 1 if the previous holder died holding it, 0 if not, -1 with an exception. */
static int lock_mutex(pthread_mutex_t *mutex) {
    int error = pthread_mutex_trylock(mutex);
    if (error == EBUSY) {
        /* Held by another worker for a few microseconds: wait without holding the GIL. A
         * stripe held for seconds means a damaged lock word, not a busy worker: fail then. */
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += LOCK_TIMEOUT_SECONDS;
        Py_BEGIN_ALLOW_THREADS
        error = pthread_mutex_timedlock(mutex, &deadline);
        Py_END_ALLOW_THREADS
        if (error == ETIMEDOUT) {
            PyErr_Format(PyExc_TimeoutError,
                         "a stripe lock of the shared-memory store was held for over %d s: "
                         "the store file may be damaged; restart the gateway to recreate it",
                         LOCK_TIMEOUT_SECONDS);
            return -1;
        }
    }
    int died = 0;
    if (error == EOWNERDEAD) {
        died = 1;
        error = pthread_mutex_consistent(mutex);
    }
    if (error) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return died;
}

/* lock(map, at) -> True if the previous holder died holding it (the mutex is usable again). */
static PyObject *lock(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lock(map, at)");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    if (at == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (get_span(args[0], &view, at, sizeof(pthread_mutex_t)) < 0) {
        return NULL;
    }
    int died = lock_mutex((pthread_mutex_t *)((char *)view.buf + at));
    PyBuffer_Release(&view);
    if (died < 0) {
        return NULL;
    }
    return PyBool_FromLong(died);
}

static PyObject *unlock(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "unlock(map, at)");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    if (at == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (get_span(args[0], &view, at, sizeof(pthread_mutex_t)) < 0) {
        return NULL;
    }
    int error = pthread_mutex_unlock((pthread_mutex_t *)((char *)view.buf + at));
    PyBuffer_Release(&view);
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static int intact(const unsigned char *record) {
    uint32_t stored;
    memcpy(&stored, record + CRC_AT, 4);
    return crc32_of(record, CRC_AT) == stored;
}

/* The offset of the intact record of `digest` under `tag` in the stripe of `slots` records at
 * `base`, probing from the home slot `home` (all checked by the caller); -1 if none. */
static Py_ssize_t find_in(const unsigned char *map, const char *digest, long tag, Py_ssize_t base,
                          Py_ssize_t home, Py_ssize_t slots) {
    const unsigned char *stripe = map + base;
    Py_ssize_t first = (home - base) / RECORD_SIZE;
    for (Py_ssize_t i = 0; i < slots; i++) {
        Py_ssize_t slot = (first + i) % slots;
        const unsigned char *record = stripe + slot * RECORD_SIZE;
        if (record[TAG_AT] == tag && memcmp(record, digest, DIGEST_SIZE) == 0 && intact(record)) {
            return base + slot * RECORD_SIZE;
        }
    }
    return -1;
}

static int check_layout(PyObject *layout, const char **codes) {
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(layout, (char **)codes, &size) < 0) {
        return -1;
    }
    if (size != 3) {
        PyErr_SetString(PyExc_ValueError, "a field layout is three codes (d, q or x)");
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        char code = (*codes)[i];
        if (code != 'd' && code != 'q' && code != 'x') {
            PyErr_Format(PyExc_ValueError, "unknown field code %c", code);
            return -1;
        }
    }
    return 0;
}

/* The used fields of `record` laid out by `codes`, as a tuple of floats and ints. */
static PyObject *fields_of(const unsigned char *record, const char *codes) {
    PyObject *values[3];
    Py_ssize_t count = 0;
    for (int i = 0; i < 3; i++) {
        const unsigned char *field = record + FIELDS_AT + 8 * i;
        PyObject *value = NULL;
        if (codes[i] == 'd') {
            double number;
            memcpy(&number, field, 8);
            value = PyFloat_FromDouble(number);
        } else if (codes[i] == 'q') {
            int64_t number;
            memcpy(&number, field, 8);
            value = PyLong_FromLongLong(number);
        } else {
            continue;
        }
        if (value == NULL) {
            for (Py_ssize_t j = 0; j < count; j++) Py_DECREF(values[j]);
            return NULL;
        }
        values[count++] = value;
    }
    PyObject *result = PyTuple_New(count);
    if (result == NULL) {
        for (Py_ssize_t j = 0; j < count; j++) Py_DECREF(values[j]);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < count; j++) PyTuple_SET_ITEM(result, j, values[j]);
    return result;
}

/* find(map, lock_at, digest, tag, base, home, slots, layout) -> (offset, fields) of the intact
 * record of `digest` under `tag` in the stripe of `slots` records at `base`, probing from the
 * home slot; (-1, None) if there is none. With `lock_at` >= 0, the stripe's mutex there is
 * locked first and stays locked (unless this raises): the caller ends with `unlock` or `save`. */
static PyObject *find(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "find(map, lock_at, digest, tag, base, home, slots, layout)");
        return NULL;
    }
    Py_ssize_t lock_at = PyLong_AsSsize_t(args[1]);
    char *digest;
    Py_ssize_t digest_size;
    if (PyErr_Occurred() || PyBytes_AsStringAndSize(args[2], &digest, &digest_size) < 0) {
        return NULL;
    }
    long tag = PyLong_AsLong(args[3]);
    Py_ssize_t base = PyLong_AsSsize_t(args[4]);
    Py_ssize_t home = PyLong_AsSsize_t(args[5]);
    Py_ssize_t slots = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    const char *codes;
    if (check_layout(args[7], &codes) < 0) {
        return NULL;
    }
    if (digest_size != DIGEST_SIZE || slots < 1 || home < base ||
        home >= base + slots * RECORD_SIZE || (home - base) % RECORD_SIZE) {
        PyErr_SetString(PyExc_ValueError, "find: a 16-byte digest and a home slot in the stripe");
        return NULL;
    }
    Py_buffer view;
    if (get_span(args[0], &view, base, slots * RECORD_SIZE) < 0) {
        return NULL;
    }
    pthread_mutex_t *mutex = NULL;
    if (lock_at >= 0) {
        if (lock_at > view.len - (Py_ssize_t)sizeof(pthread_mutex_t)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_IndexError, "find: the lock is outside the map");
            return NULL;
        }
        mutex = (pthread_mutex_t *)((char *)view.buf + lock_at);
        if (lock_mutex(mutex) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    const unsigned char *map = (const unsigned char *)view.buf;
    Py_ssize_t at = find_in(map, digest, tag, base, home, slots);
    PyObject *fields = NULL;
    if (at >= 0) {
        fields = fields_of(map + at, codes);
    } else {
        fields = Py_None;
        Py_INCREF(fields);
    }
    PyObject *result = fields == NULL ? NULL : PyTuple_New(2);
    if (result == NULL) {
        Py_XDECREF(fields);
        if (mutex != NULL) pthread_mutex_unlock(mutex);
        PyBuffer_Release(&view);
        return NULL;
    }
    PyBuffer_Release(&view);
    PyObject *offset = PyLong_FromSsize_t(at);
    if (offset == NULL) {
        Py_DECREF(fields);
        Py_DECREF(result);
        if (mutex != NULL) pthread_mutex_unlock(mutex);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, offset);
    PyTuple_SET_ITEM(result, 1, fields);
    return result;
}

/* The record of `digest` under `tag` with `fields` (laid out by `codes`) and `expires`, in
 * `record`: everything converted first, so that nothing is written if a value does not fit. */
static int build_record(unsigned char *record, PyObject *const *args) {
    char *digest;
    Py_ssize_t digest_size;
    if (PyBytes_AsStringAndSize(args[0], &digest, &digest_size) < 0) {
        return -1;
    }
    long tag = PyLong_AsLong(args[1]);
    if (tag == -1 && PyErr_Occurred()) {
        return -1;
    }
    const char *codes;
    if (check_layout(args[2], &codes) < 0) {
        return -1;
    }
    PyObject *fields = args[3];
    double expires = PyFloat_AsDouble(args[4]);
    if (expires == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (digest_size != DIGEST_SIZE || tag < 1 || tag > 255 || !PyTuple_Check(fields)) {
        PyErr_SetString(PyExc_ValueError, "a record needs a 16-byte digest, a tag 1-255, a tuple");
        return -1;
    }
    memset(record, 0, RECORD_SIZE);
    memcpy(record, digest, DIGEST_SIZE);
    record[TAG_AT] = (unsigned char)tag;
    Py_ssize_t used = 0;
    for (int i = 0; i < 3; i++) {
        if (codes[i] == 'x') {
            continue;
        }
        if (used >= PyTuple_GET_SIZE(fields)) {
            PyErr_SetString(PyExc_ValueError, "fewer fields than the layout has");
            return -1;
        }
        PyObject *value = PyTuple_GET_ITEM(fields, used++);
        unsigned char *field = record + FIELDS_AT + 8 * i;
        if (codes[i] == 'd') {
            double number = PyFloat_AsDouble(value);
            if (number == -1.0 && PyErr_Occurred()) return -1;
            memcpy(field, &number, 8);
        } else {
            if (!PyLong_Check(value)) {
                PyErr_SetString(PyExc_TypeError, "an integer field needs an int");
                return -1;
            }
            long long number = PyLong_AsLongLong(value);
            if (number == -1 && PyErr_Occurred()) return -1;
            int64_t exact = (int64_t)number;
            memcpy(field, &exact, 8);
        }
    }
    if (used != PyTuple_GET_SIZE(fields)) {
        PyErr_SetString(PyExc_ValueError, "more fields than the layout has");
        return -1;
    }
    memcpy(record + EXPIRES_AT, &expires, 8);
    uint32_t crc = crc32_of(record, CRC_AT);
    memcpy(record + CRC_AT, &crc, 4);
    return 0;
}

/* encode(digest, tag, layout, fields, expires) -> the 64 bytes of the record. */
static PyObject *encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "encode(digest, tag, layout, fields, expires)");
        return NULL;
    }
    unsigned char record[RECORD_SIZE];
    if (build_record(record, args) < 0) {
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)record, RECORD_SIZE);
}

/* save(map, at, digest, tag, layout, fields, expires, unlock_at): write a whole record with its
 * CRC; then, with `unlock_at` >= 0, unlock the mutex there (whether the write succeeded or not:
 * nothing is written unless every value fits). */
static PyObject *save(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "save(map, at, digest, tag, layout, fields, expires, unlock_at)");
        return NULL;
    }
    Py_ssize_t unlock_at = PyLong_AsSsize_t(args[7]);
    if (unlock_at == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    pthread_mutex_t *mutex = NULL;
    if (unlock_at >= 0 && unlock_at <= view.len - (Py_ssize_t)sizeof(pthread_mutex_t)) {
        mutex = (pthread_mutex_t *)((char *)view.buf + unlock_at);
    }
    int ok = 0;
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    unsigned char record[RECORD_SIZE];
    if (at == -1 && PyErr_Occurred()) {
        /* the error stands */
    } else if (at < 0 || at > view.len - RECORD_SIZE || (unlock_at >= 0 && mutex == NULL)) {
        PyErr_SetString(PyExc_IndexError, "save: the record or the lock is outside the map");
    } else if (build_record(record, args + 2) == 0) {
        memcpy((char *)view.buf + at, record, RECORD_SIZE);
        ok = 1;
    }
    if (mutex != NULL) {
        pthread_mutex_unlock(mutex);
    }
    PyBuffer_Release(&view);
    if (!ok) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- Deciding ------------------------------------------------------------------------------
 *
 * `hit` decides fixed-window, sliding-window, token-bucket, leaky-bucket and concurrency limits
 * here, exactly as `tollgate.ratelimit.algorithms` does: each function below is its Python
 * namesake, operation for operation, in the same order. That gives the same doubles because
 *
 * - C doubles and Python floats are both IEEE binary64 and `+ - * /` round alike, provided
 *   each operation is rounded on its own: no fused multiply-add (contraction is switched off
 *   below) and no excess precision (FLT_EVAL_METHOD 0; where it is not, `hit` decides
 *   nothing and Python does it all);
 * - every integer is kept within +-2**50 (a limit, a cost, a stored count), so that sums and
 *   differences of three of them are exact in int64 and in a double alike: Python's mixed
 *   comparisons (`float <= int`, exact) and true divisions (`int / int`, correctly rounded)
 *   then give what the same operation on the integers converted to doubles gives. `hit`
 *   leaves anything larger to Python;
 * - Python's `x % y` on floats is `fmod` with the result moved to the divisor's sign
 *   (`py_mod`), `int()` truncates (a cast), `math.ceil` is `ceil`, `math.ulp` and
 *   `math.nextafter` are CPython's own arithmetic (`py_ulp`, `nextafter`), and `max(a, b)`
 *   keeps `a` unless `b` is greater;
 * - states are read from and written to the record's float64 and int64 fields, which is what
 *   the Python path's struct codec does too.
 *
 * Stored values a correct writer never leaves (a non-finite time, a count past 2**50 or below
 * zero) are not decided here either: Python decides those as it always has.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define EXACT_DOUBLES 1
#else
#define EXACT_DOUBLES 0
#endif

/* algorithms.TOKEN_EPSILON */
#define TOKEN_EPSILON 1e-9
/* Integers decided here stay within +-2**50 (see above). */
#define EXACT_INTEGER (INT64_C(1) << 50)
/* A double whose truncation or ceiling surely fits an int64. */
#define SAFE_DOUBLE 4.0e18

/* Algorithm codes: the store's record tags (shm.KIND_TAGS). */
enum {
    FIXED_WINDOW = 1,
    SLIDING_WINDOW = 3,
    TOKEN_BUCKET = 4,
    LEAKY_BUCKET = 5,
    CONCURRENCY = 6,
};

/* One limit's parameters, packed once per algorithm by shm.py (struct "<qqdd"):
 * fixed-window and sliding-window: limit, window, 0; token-bucket: burst, rate, capacity
 * (the burst as a float); leaky-bucket: capacity, rate, room (max_delay * rate + epsilon);
 * concurrency: limit, retry_after, 0. */
typedef struct {
    int64_t kind;
    int64_t limit;
    double a;
    double b;
} Params;

/* What one limit says about one request (algorithms.Decision), and, if admitted, the record
 * fields and expiry of the key's next state. */
typedef struct {
    int allowed;
    int64_t limit;
    int64_t remaining;
    double reset_after;
    double retry_after;
    double delay;
    unsigned char fields[24];
    double expires;
} Verdict;

static double get_double(const unsigned char *record, int field) {
    double value;
    memcpy(&value, record + FIELDS_AT + 8 * field, 8);
    return value;
}

static int64_t get_int(const unsigned char *record, int field) {
    int64_t value;
    memcpy(&value, record + FIELDS_AT + 8 * field, 8);
    return value;
}

static void put_double(Verdict *verdict, int field, double value) {
    memcpy(verdict->fields + 8 * field, &value, 8);
}

static void put_int(Verdict *verdict, int field, int64_t value) {
    memcpy(verdict->fields + 8 * field, &value, 8);
}

static int is_count(int64_t value) {
    return value >= 0 && value <= EXACT_INTEGER;
}

static int is_amount(double value) {
    return value >= -SAFE_DOUBLE && value <= SAFE_DOUBLE; /* false for NaN too */
}

static void admit(Verdict *verdict, int64_t limit, int64_t remaining, double reset_after,
                  double delay) {
    verdict->allowed = 1;
    verdict->limit = limit;
    verdict->remaining = remaining;
    verdict->reset_after = reset_after;
    verdict->retry_after = 0.0;
    verdict->delay = delay;
}

static void reject(Verdict *verdict, int64_t limit, int64_t remaining, double reset_after,
                   double retry_after) {
    verdict->allowed = 0;
    verdict->limit = limit;
    verdict->remaining = remaining;
    verdict->reset_after = reset_after;
    verdict->retry_after = retry_after;
    verdict->delay = 0.0;
}

/* Python's `x % divisor` on floats (CPython's float_rem). */
static double py_mod(double x, double divisor) {
    double mod = fmod(x, divisor);
    if (mod) {
        if ((divisor < 0) != (mod < 0)) {
            mod += divisor;
        }
    } else {
        mod = copysign(0.0, divisor);
    }
    return mod;
}

/* math.ulp (CPython's math_ulp). */
static double py_ulp(double x) {
    if (isnan(x)) {
        return x;
    }
    x = fabs(x);
    if (isinf(x)) {
        return x;
    }
    double next = nextafter(x, INFINITY);
    if (isinf(next)) {
        next = nextafter(x, -INFINITY);
        return x - next;
    }
    return next - x;
}

/* algorithms._seconds_until */
static double seconds_until(double now, double moment) {
    double wait = moment - now;
    while (now + wait < moment) {
        wait = nextafter(wait, INFINITY);
    }
    return wait;
}

typedef int (*Admits)(const void *context, double t);

/* algorithms._retry_after */
static double retry_after(double now, double moment, Admits admits, const void *context) {
    if (now > moment) {
        moment = now;
    }
    double step = 0.0;
    while (!admits(context, moment)) {
        double ulp = py_ulp(moment);
        double doubled = 2.0 * step;
        step = ulp > doubled ? ulp : doubled;
        moment += step;
        if (isinf(moment)) {
            return INFINITY;
        }
    }
    return seconds_until(now, moment);
}

/* - fixed windows (algorithms._PeriodCounter with FixedWindow's periods) */

typedef struct {
    double window;
    double counted;
} LaterWindow;

/* FixedWindow._is_later_period(t, counted) */
static int is_later_window(const void *context, double t) {
    const LaterWindow *later = context;
    return t - py_mod(t, later->window) > later->counted;
}

static int decide_fixed_window(const Params *params, const unsigned char *record, double now,
                               int64_t cost, Verdict *verdict) {
    int64_t limit = params->limit;
    double window = params->a;
    double start = now - py_mod(now, window);
    int64_t used = 0;
    if (record != NULL) {
        double stored_start = get_double(record, 0);
        int64_t spent = get_int(record, 1);
        if (!isfinite(stored_start) || !is_count(spent)) {
            return 0;
        }
        if (!(stored_start < start)) {
            used = spent;
            start = stored_start;
        }
    }
    if (used + cost <= limit) {
        admit(verdict, limit, limit - used - cost, start + window - now, 0.0);
        put_double(verdict, 0, start);
        put_int(verdict, 1, used + cost);
        verdict->expires = start + window;
        return 1;
    }
    double retry;
    if (cost > limit) {
        retry = INFINITY;
    } else {
        LaterWindow later = {window, start};
        retry = retry_after(now, start + window, is_later_window, &later);
    }
    double reset = used ? start + window - now : 0.0;
    reject(verdict, limit, limit - used, reset, retry);
    return 1;
}

/* - sliding window counter (algorithms.SlidingWindowCounter) */

typedef struct {
    int present; /* 0: None */
    double start;
    int64_t previous;
    int64_t current;
} Counts;

/* SlidingWindowCounter._roll */
static Counts roll(double window, const Counts *state, double now) {
    Counts none = {0, 0.0, 0, 0};
    if (!state->present) {
        return none;
    }
    double start = now - py_mod(now, window);
    if (state->start >= start) {
        return *state;
    }
    if (start - state->start < 1.5 * window) {
        if (state->current) {
            Counts rolled = {1, start, state->current, 0};
            return rolled;
        }
        return none;
    }
    return none;
}

/* SlidingWindowCounter._weighted_previous */
static double weighted_previous(double window, const Counts *state, double now) {
    int64_t previous = state->previous;
    if (!previous) {
        return 0.0;
    }
    double elapsed = now - state->start;
    if (elapsed <= 0) {
        return (double)previous;
    }
    return (double)previous * (window - elapsed) / window;
}

typedef struct {
    double window;
    int64_t limit;
    int64_t cost;
    Counts state;
} SlidingAdmits;

/* SlidingWindowCounter._admits */
static int sliding_admits(const void *context, double t) {
    const SlidingAdmits *admits = context;
    Counts rolled = roll(admits->window, &admits->state, t);
    if (!rolled.present) {
        return admits->cost <= admits->limit;
    }
    return weighted_previous(admits->window, &rolled, t) <=
           (double)(admits->limit - rolled.current - admits->cost);
}

static int decide_sliding_window(const Params *params, const unsigned char *record, double now,
                                 int64_t cost, Verdict *verdict) {
    int64_t limit = params->limit;
    double window = params->a;
    Counts state = {0, 0.0, 0, 0};
    if (record != NULL) {
        state.present = 1;
        state.start = get_double(record, 0);
        state.previous = get_int(record, 1);
        state.current = get_int(record, 2);
        if (!isfinite(state.start) || !is_count(state.previous) || !is_count(state.current)) {
            return 0;
        }
    }
    Counts rolled = roll(window, &state, now);
    if (!rolled.present) {
        Counts fresh = {1, now - py_mod(now, window), 0, 0};
        rolled = fresh;
    }
    double start = rolled.start;
    int64_t previous = rolled.previous;
    int64_t current = rolled.current;
    double weighted = weighted_previous(window, &rolled, now);
    if (!is_amount(weighted)) {
        return 0;
    }
    int64_t weighted_up = (int64_t)ceil(weighted);
    int64_t room = limit - current - cost;
    if (weighted <= (double)room) {
        admit(verdict, limit, room - weighted_up, start + 2 * window - now, 0.0);
        put_double(verdict, 0, start);
        put_int(verdict, 1, previous);
        put_int(verdict, 2, current + cost);
        verdict->expires = start + 2 * window;
        return 1;
    }
    double retry;
    if (cost > limit) {
        retry = INFINITY;
    } else {
        double moment;
        if (room >= 0) {
            moment = start + window * (1 - (double)room / (double)previous);
        } else {
            moment = start + window + window * (1 - (double)(limit - cost) / (double)current);
        }
        SlidingAdmits admits = {window, limit, cost, state};
        retry = retry_after(now, moment, sliding_admits, &admits);
    }
    double faded;
    if (current) {
        faded = start + 2 * window;
    } else if (previous) {
        faded = start + window;
    } else {
        faded = now;
    }
    int64_t remaining = limit - current - weighted_up;
    reject(verdict, limit, remaining > 0 ? remaining : 0, faded - now, retry);
    return 1;
}

/* - token bucket (algorithms.TokenBucket) */

typedef struct {
    double rate;
    double capacity;
    double tokens;
    double updated_at;
    int64_t cost;
} Bucket;

/* TokenBucket._tokens */
static double bucket_tokens(const Bucket *bucket, double now) {
    double elapsed = now - bucket->updated_at;
    if (elapsed <= 0) {
        return bucket->tokens;
    }
    double tokens = bucket->tokens + elapsed * bucket->rate;
    return tokens < bucket->capacity ? tokens : bucket->capacity;
}

static int bucket_admits(const void *context, double t) {
    const Bucket *bucket = context;
    return bucket_tokens(bucket, t) + TOKEN_EPSILON >= (double)bucket->cost;
}

static int decide_token_bucket(const Params *params, const unsigned char *record, double now,
                               int64_t cost, Verdict *verdict) {
    int64_t burst = params->limit;
    Bucket stored = {params->a, params->b, 0.0, 0.0, cost};
    double rate = stored.rate;
    double capacity = stored.capacity;
    double tokens, updated_at;
    if (record == NULL) {
        tokens = capacity;
        updated_at = now;
    } else {
        stored.tokens = get_double(record, 0);
        stored.updated_at = get_double(record, 1);
        if (!is_amount(stored.tokens) || !isfinite(stored.updated_at)) {
            return 0;
        }
        tokens = bucket_tokens(&stored, now);
        updated_at = now > stored.updated_at ? now : stored.updated_at;
    }
    if (tokens + TOKEN_EPSILON >= (double)cost) {
        double left = tokens - (double)cost;
        double reset = updated_at + (capacity - left) / rate - now;
        admit(verdict, burst, (int64_t)(left + TOKEN_EPSILON), reset, 0.0);
        put_double(verdict, 0, left);
        put_double(verdict, 1, updated_at);
        verdict->expires = updated_at + (capacity - left) / rate;
        return 1;
    }
    double retry;
    if (cost > burst || record == NULL) {
        retry = INFINITY;
    } else {
        double moment =
            stored.updated_at + ((double)cost - TOKEN_EPSILON - stored.tokens) / rate;
        retry = retry_after(now, moment, bucket_admits, &stored);
    }
    double reset = updated_at + (capacity - tokens) / rate - now;
    reject(verdict, burst, (int64_t)(tokens + TOKEN_EPSILON), reset, retry);
    return 1;
}

/* - leaky bucket (algorithms.LeakyBucket) */

typedef struct {
    double rate;
    double room;
    double queued;
    double updated_at;
    int64_t cost;
} Queue;

/* LeakyBucket._queued */
static double queue_queued(const Queue *queue, double now) {
    double elapsed = now - queue->updated_at;
    if (elapsed <= 0) {
        return queue->queued;
    }
    double queued = queue->queued - elapsed * queue->rate;
    return queued > 0 ? queued : 0.0;
}

static int queue_admits(const void *context, double t) {
    const Queue *queue = context;
    return queue->room - queue_queued(queue, t) >= (double)(queue->cost - 1);
}

static int decide_leaky_bucket(const Params *params, const unsigned char *record, double now,
                               int64_t cost, Verdict *verdict) {
    int64_t capacity = params->limit;
    Queue stored = {params->a, params->b, 0.0, 0.0, cost};
    double rate = stored.rate;
    double queued, updated_at;
    if (record == NULL) {
        queued = 0.0;
        updated_at = now;
    } else {
        stored.queued = get_double(record, 0);
        stored.updated_at = get_double(record, 1);
        if (!is_amount(stored.queued) || !isfinite(stored.updated_at)) {
            return 0;
        }
        queued = queue_queued(&stored, now);
        updated_at = now > stored.updated_at ? now : stored.updated_at;
    }
    double room = stored.room - queued;
    if (room >= (double)(cost - 1)) {
        double after = queued + (double)cost;
        double room_after = stored.room - after;
        int64_t remaining = room_after >= 0 ? (int64_t)room_after + 1 : 0;
        double reset = updated_at - now + after / rate;
        admit(verdict, capacity, remaining, reset, queued / rate);
        put_double(verdict, 0, after);
        put_double(verdict, 1, updated_at);
        verdict->expires = updated_at + after / rate;
        return 1;
    }
    double retry;
    if (cost > capacity || record == NULL) {
        retry = INFINITY;
    } else {
        double moment = stored.updated_at + (stored.queued - stored.room + (double)cost - 1) / rate;
        retry = retry_after(now, moment, queue_admits, &stored);
    }
    int64_t remaining = room >= 0 ? (int64_t)room + 1 : 0;
    double reset = updated_at - now + queued / rate;
    reject(verdict, capacity, remaining, reset, retry);
    return 1;
}

/* - concurrency (algorithms.Concurrency) */

static int decide_concurrency(const Params *params, const unsigned char *record, double now,
                              int64_t cost, Verdict *verdict) {
    int64_t limit = params->limit;
    double hint = params->a;
    int64_t in_flight = 0;
    if (record != NULL) {
        in_flight = get_int(record, 0);
        if (!is_count(in_flight)) {
            return 0;
        }
    }
    if (in_flight + cost <= limit) {
        admit(verdict, limit, limit - in_flight - cost, hint, 0.0);
        put_int(verdict, 0, in_flight + cost);
        verdict->expires = INFINITY; /* only a release frees what is in flight */
        return 1;
    }
    double retry = cost > limit ? INFINITY : hint;
    double reset = in_flight ? hint : 0.0;
    reject(verdict, limit, limit - in_flight, reset, retry);
    return 1;
}

/* The decision on a request of `cost` at `now` for the key whose record is `record` (NULL: no
 * state): 1 with `verdict` filled, 0 to leave it to Python. */
static int decide(const Params *params, const unsigned char *record, double now, int64_t cost,
                  Verdict *verdict) {
    memset(verdict->fields, 0, sizeof(verdict->fields)); /* unused fields are zero */
    switch (params->kind) {
    case FIXED_WINDOW:
        return decide_fixed_window(params, record, now, cost, verdict);
    case SLIDING_WINDOW:
        return decide_sliding_window(params, record, now, cost, verdict);
    case TOKEN_BUCKET:
        return decide_token_bucket(params, record, now, cost, verdict);
    case LEAKY_BUCKET:
        return decide_leaky_bucket(params, record, now, cost, verdict);
    case CONCURRENCY:
        return decide_concurrency(params, record, now, cost, verdict);
    default:
        return 0;
    }
}

/* Parameters a caller packed: a known kind, a limit within the exact range, positive finite
 * doubles (the leaky bucket's room and a padding zero may be 0). */
static int check_params(const Params *params) {
    int known = params->kind == FIXED_WINDOW || params->kind == SLIDING_WINDOW ||
                params->kind == TOKEN_BUCKET || params->kind == LEAKY_BUCKET ||
                params->kind == CONCURRENCY;
    if (!known || params->limit < 1 || params->limit > EXACT_INTEGER || !(params->a > 0) ||
        !isfinite(params->a) || !(params->b >= 0) || !isfinite(params->b)) {
        PyErr_SetString(PyExc_ValueError, "hit: parameters of an unknown kind or out of range");
        return -1;
    }
    return 0;
}

/* The eviction counter in the stripe's counter line at `line`, plus one (shm._count_eviction:
 * a count whose CRC-32 does not match restarts from zero). */
static void count_eviction(unsigned char *line) {
    uint64_t count;
    uint32_t crc;
    memcpy(&count, line, 8);
    memcpy(&crc, line + COUNTER_CRC_AT, 4);
    if (crc32_of(line, 8) != crc) {
        count = 0;
    }
    count += 1;
    memcpy(line, &count, 8);
    crc = crc32_of(line, 8);
    memcpy(line + COUNTER_CRC_AT, &crc, 4);
}

/* A slot for a new record, as shm._free_slot chooses it with nothing held: the first free slot
 * from home on (wrapping), else the first torn or expired one, else the one whose state
 * expires first (an eviction, counted in the stripe's line). */
static Py_ssize_t free_slot(unsigned char *map, Py_ssize_t line, Py_ssize_t base, Py_ssize_t home,
                            Py_ssize_t slots, double now) {
    const unsigned char *stripe = map + base;
    Py_ssize_t first = (home - base) / RECORD_SIZE;
    for (Py_ssize_t i = 0; i < slots; i++) {
        Py_ssize_t slot = (first + i) % slots;
        if (stripe[slot * RECORD_SIZE + TAG_AT] == 0) {
            return base + slot * RECORD_SIZE;
        }
    }
    Py_ssize_t victim = -1;
    double earliest = INFINITY;
    for (Py_ssize_t i = 0; i < slots; i++) {
        Py_ssize_t at = base + (first + i) % slots * RECORD_SIZE;
        if (!intact(map + at)) {
            return at;
        }
        double expires;
        memcpy(&expires, map + at + EXPIRES_AT, 8);
        if (expires <= now) {
            return at;
        }
        if (victim < 0 || expires < earliest) {
            victim = at;
            earliest = expires;
        }
    }
    count_eviction(map + line);
    return victim;
}

/* A tuple (allowed, limit, remaining, reset_after, retry_after, delay): Decision's fields. */
static PyObject *verdict_tuple(const Verdict *verdict) {
    PyObject *result = PyTuple_New(6);
    if (result == NULL) {
        return NULL;
    }
    PyObject *allowed = verdict->allowed ? Py_True : Py_False;
    Py_INCREF(allowed);
    PyTuple_SET_ITEM(result, 0, allowed);
    PyObject *items[5] = {
        PyLong_FromLongLong(verdict->limit),       PyLong_FromLongLong(verdict->remaining),
        PyFloat_FromDouble(verdict->reset_after), PyFloat_FromDouble(verdict->retry_after),
        PyFloat_FromDouble(verdict->delay),
    };
    int failed = 0;
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL) {
            failed = 1;
            items[i] = Py_None;
            Py_INCREF(Py_None);
        }
        PyTuple_SET_ITEM(result, i + 1, items[i]);
    }
    if (failed) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* The template pieces p0..p4 joined around remaining, reset, remaining, reset: the header
 * lines of limiter.CompiledLimits.block (reset in whole seconds, rounded up, 0 if none left). */
#define LONGEST_RESET 2147483647.0

/* `value` in decimal into `out` (24 bytes hold any long long), as "%lld" would; the length. */
static int decimal(char *out, long long value) {
    char digits[24];
    int count = 0;
    unsigned long long magnitude =
        value < 0 ? 0ULL - (unsigned long long)value : (unsigned long long)value;
    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    int length = 0;
    if (value < 0) {
        out[length++] = '-';
    }
    while (count) {
        out[length++] = digits[--count];
    }
    return length;
}

static PyObject *render_fields(PyObject *pieces, const Verdict *verdict) {
    double reset = verdict->reset_after;
    if (!(reset < LONGEST_RESET)) { /* NaN, or told as headers.LONGEST_RESET: the tuple path */
        return verdict_tuple(verdict);
    }
    long long whole = reset > 0 ? (long long)ceil(reset) : 0;
    char numbers[2][24];
    int lengths[2];
    lengths[0] = decimal(numbers[0], (long long)verdict->remaining);
    lengths[1] = decimal(numbers[1], whole);
    Py_ssize_t total = 2 * (Py_ssize_t)(lengths[0] + lengths[1]);
    for (int i = 0; i < 5; i++) {
        PyObject *piece = PyTuple_GET_ITEM(pieces, i);
        if (!PyBytes_CheckExact(piece)) {
            PyErr_SetString(PyExc_TypeError, "hit: fields must be a tuple of five bytes objects");
            return NULL;
        }
        total += PyBytes_GET_SIZE(piece);
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    for (int i = 0; i < 5; i++) {
        PyObject *piece = PyTuple_GET_ITEM(pieces, i);
        Py_ssize_t size = PyBytes_GET_SIZE(piece);
        memcpy(out, PyBytes_AS_STRING(piece), (size_t)size);
        out += size;
        if (i < 4) {
            int which = i % 2;
            memcpy(out, numbers[which], (size_t)lengths[which]);
            out += lengths[which];
        }
    }
    return result;
}

/* Where a key's record is, packed once per key by shm.py: its digest, then (int64, struct
 * "<qqqqq") the stripe's first byte, the home slot's, the stripe's counter line, the slots per
 * stripe, and whether to lock the mutex in the counter line. */
typedef struct {
    char digest[DIGEST_SIZE];
    int64_t base;
    int64_t home;
    int64_t line;
    int64_t slots;
    int64_t locked;
} Where;

/* hit(map, where, params, now, cost): one limit's request, decided whole.
 *
 * Locks the stripe's mutex (if `where` says so), finds the record of the key's digest under
 * the kind's tag, decides as the kind's algorithm does with `params`, writes the new state if
 * the request is admitted (a new key's record where `free_slot` says), unlocks, and returns
 * the decision's fields as a tuple. Returns None, having changed nothing, when the request is
 * not one to decide here: `now` not a finite float, `cost` not an integer from 1 to 2**50, or
 * a stored state outside what the algorithms write; Python then decides it as it does every
 * other request.
 *
 * With a sixth argument `fields`, five bytes objects (the pieces of limiter.CompiledLimits'
 * field template, around remaining, reset, remaining, reset), an admitted request that waits
 * for nothing gets the response's rate-limit header lines as one bytes object instead of the
 * tuple: the common request then makes no Python object but that one. */
static PyObject *hit(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "hit(map, where, params, now, cost[, fields])");
        return NULL;
    }
    PyObject *fields = nargs == 6 ? args[5] : NULL;
    if (fields != NULL && (!PyTuple_CheckExact(fields) || PyTuple_GET_SIZE(fields) != 5)) {
        PyErr_SetString(PyExc_TypeError, "hit: fields must be a tuple of five bytes objects");
        return NULL;
    }
    char *packed_where;
    Py_ssize_t where_size;
    if (PyBytes_AsStringAndSize(args[1], &packed_where, &where_size) < 0) {
        return NULL;
    }
    char *packed;
    Py_ssize_t packed_size;
    if (PyBytes_AsStringAndSize(args[2], &packed, &packed_size) < 0) {
        return NULL;
    }
    if (where_size != (Py_ssize_t)sizeof(Where) || packed_size != (Py_ssize_t)sizeof(Params)) {
        PyErr_SetString(PyExc_ValueError, "hit: a packed place and packed parameters");
        return NULL;
    }
    Where where;
    memcpy(&where, packed_where, sizeof(Where));
    Py_ssize_t base = (Py_ssize_t)where.base;
    Py_ssize_t home = (Py_ssize_t)where.home;
    Py_ssize_t line = (Py_ssize_t)where.line;
    Py_ssize_t slots = (Py_ssize_t)where.slots;
    if (slots < 1 || slots > PY_SSIZE_T_MAX / RECORD_SIZE || base < 0 || home < base ||
        home >= base + slots * RECORD_SIZE || (home - base) % RECORD_SIZE) {
        PyErr_SetString(PyExc_ValueError, "hit: a home slot in the stripe");
        return NULL;
    }
    Params params;
    memcpy(&params, packed, sizeof(Params));
    if (check_params(&params) < 0) {
        return NULL;
    }
    if (!EXACT_DOUBLES || !PyFloat_CheckExact(args[3]) || !PyLong_Check(args[4])) {
        Py_RETURN_NONE;
    }
    double now = PyFloat_AS_DOUBLE(args[3]);
    int overflow;
    long long cost = PyLong_AsLongLongAndOverflow(args[4], &overflow);
    if (cost == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!isfinite(now) || overflow || cost < 1 || cost > EXACT_INTEGER) {
        Py_RETURN_NONE;
    }
    Py_buffer view;
    if (get_span(args[0], &view, base, slots * RECORD_SIZE) < 0) {
        return NULL;
    }
    if (line < 0 || line > view.len - COUNTER_SIZE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_IndexError, "hit: the stripe's counter line is outside the map");
        return NULL;
    }
    unsigned char *map = (unsigned char *)view.buf;
    pthread_mutex_t *mutex = NULL;
    if (where.locked) {
        mutex = (pthread_mutex_t *)(map + line + MUTEX_AT);
        if (lock_mutex(mutex) < 0) { /* a holder that died: its records' CRCs tell */
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    const char *digest = where.digest;
    Py_ssize_t at = find_in(map, digest, (long)params.kind, base, home, slots);
    Verdict verdict;
    int decided = decide(&params, at >= 0 ? map + at : NULL, now, (int64_t)cost, &verdict);
    if (decided && verdict.allowed) {
        if (at < 0) {
            at = free_slot(map, line, base, home, slots, now);
        }
        unsigned char *record = map + at;
        memcpy(record, digest, DIGEST_SIZE);
        memset(record + DIGEST_SIZE, 0, FIELDS_AT - DIGEST_SIZE);
        record[TAG_AT] = (unsigned char)params.kind;
        memcpy(record + FIELDS_AT, verdict.fields, sizeof(verdict.fields));
        memcpy(record + EXPIRES_AT, &verdict.expires, 8);
        uint32_t crc = crc32_of(record, CRC_AT);
        memcpy(record + CRC_AT, &crc, 4);
        memset(record + CRC_AT + 4, 0, RECORD_SIZE - CRC_AT - 4);
    }
    if (mutex != NULL) {
        pthread_mutex_unlock(mutex);
    }
    PyBuffer_Release(&view);
    if (!decided) {
        Py_RETURN_NONE;
    }
    if (fields != NULL && verdict.allowed && verdict.delay == 0.0) {
        return render_fields(fields, &verdict);
    }
    return verdict_tuple(&verdict);
}

static PyObject *crc32(PyObject *module, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint32_t crc = crc32_of((const unsigned char *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef methods[] = {
    {"mutex_size", mutex_size, METH_NOARGS, "Bytes of one pthread mutex."},
    {"init_locks", (PyCFunction)(void (*)(void))init_locks, METH_FASTCALL,
     "init_locks(map, first, stride, count): make robust process-shared mutexes."},
    {"lock", (PyCFunction)(void (*)(void))lock, METH_FASTCALL,
     "lock(map, at) -> True if the last holder died holding it."},
    {"unlock", (PyCFunction)(void (*)(void))unlock, METH_FASTCALL, "unlock(map, at)."},
    {"find", (PyCFunction)(void (*)(void))find, METH_FASTCALL,
     "find(map, lock_at, digest, tag, base, home, slots, layout) -> (offset, fields)."},
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL,
     "encode(digest, tag, layout, fields, expires) -> the record's 64 bytes."},
    {"save", (PyCFunction)(void (*)(void))save, METH_FASTCALL,
     "save(map, at, digest, tag, layout, fields, expires, unlock_at)."},
    {"hit", (PyCFunction)(void (*)(void))hit, METH_FASTCALL,
     "hit(map, where, params, now, cost[, fields]) -> (allowed, limit, remaining, "
     "reset_after, retry_after, delay), the rendered fields when given and admitted at once, "
     "or None to decide in Python."},
    {"crc32", crc32, METH_O, "CRC-32 of a bytes-like object (as zlib.crc32)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_shmtable",
    "Stripe locks, record reads and writes, and single-limit decisions of the shared-memory "
    "rate-limit store.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__shmtable(void) {
    make_crc_tables();
    return PyModule_Create(&module_definition);
}
