/*
 * The shared-memory store's primitives in C: stripe locks and record reads and writes.
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
 *   polynomial and result as zlib.crc32, so the pure-Python code reads what this writes).
 *
 * The record layout is the one shm.py documents (little-endian): digest (16), tag (1),
 * padding (7), three 8-byte fields, expiry (float64), CRC-32 of bytes 0-55, padding (4).
 * Field layouts are strings of three codes: 'd' float64, 'q' int64, 'x' unused (zero).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
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

static uint32_t crc_table[256];

static void make_crc_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[n] = c;
    }
}

static uint32_t crc32_of(const unsigned char *data, size_t length) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < length; i++) {
        c = crc_table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
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
    {"crc32", crc32, METH_O, "CRC-32 of a bytes-like object (as zlib.crc32)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_shmtable",
    "Stripe locks and record reads and writes of the shared-memory rate-limit store.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__shmtable(void) {
    make_crc_table();
    return PyModule_Create(&module_definition);
}
