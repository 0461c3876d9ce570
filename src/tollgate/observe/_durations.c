/* The three duration histograms of one route in one worker, counted without Python objects.
 *
 * `WorkerMetrics.observe` (observe/metrics.py) runs once per finished call. In Python each of
 * its three histograms costs a bucket scan over boxed floats, a new int object per bucket
 * increment (past 256) and a new float per sum: about 1.1 us of a worker's 16 us per proxied
 * request in the compiled build, by the live profile. Here the counts are machine integers and
 * the sums doubles, and one call observes all three. Nothing in prometheus_client does this
 * without its multi-process files; the Python class in metrics.py is the reference (and the
 * fallback of a build without a compiler), and a test checks the two count alike.
 *
 * Durations(bounds): bounds are the buckets' upper bounds in seconds, ascending (at most 32);
 * a value lands in the first bucket whose bound is >= it, else in the last (+Inf) one.
 * observe(total, upstream): the call's total seconds, and its upstream seconds or a negative
 * number when it had no upstream; the gateway's share is total minus upstream, never below 0.
 * lists(): ([*counts, sum] of request, gateway, upstream), as Histogram.to_list gives them.
 *
 * bucket_counts(values, multiplier, floor): for the latency sketches of the rollups
 * (observe/sketch.py, LatencySketch.add_many): values is a buffer of doubles (an array('d'));
 * returns ({bucket: count}, zeros, sum, min, max), where a value above floor is in bucket
 * ceil(log(value) * multiplier), as the Python code computes it, and the others are zeros;
 * or None if a value is negative, NaN or infinite (the caller then adds them one at a time,
 * which says which). In Python that is about 0.35 us a value (three values a call), and the
 * builtins sum, min and max another 0.08 us, as each makes a float object per value; here a
 * few ns.
 *
 * aggregate(records, minutes, fields, empty): the rollups' minute aggregates
 * (observe/rollups.py, RollupAggregator.add_batch, whose Python code is the reference and the
 * fallback): each record (a tuple) is counted in minutes[(minute, service, route, consumer,
 * status class)], a tuple of four bytearrays: five native int64 counters (calls, 4xx, 5xx,
 * bytes in, bytes out), then the total, gateway and upstream latencies as native doubles
 * appended. `fields` are the indexes of time, service, route, consumer, status, bytes in,
 * bytes out, total, gateway and upstream ms in a record; `empty` stands for a missing service,
 * route or consumer. The Python loop is about 1.2 us a record in the writer thread, which
 * shares the core with the event loop; here a record of the same key as the one before it
 * costs no allocation and no dict look-up. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BOUNDS 32

typedef struct {
    uint64_t counts[MAX_BOUNDS + 1];
    double sum;
} Histogram;

typedef struct {
    PyObject_HEAD
    int bounds_count;
    double bounds[MAX_BOUNDS];
    Histogram request;
    Histogram gateway;
    Histogram upstream;
} Durations;

static void add(const Durations *self, Histogram *histogram, double value) {
    int index = 0;
    while (index < self->bounds_count && !(value <= self->bounds[index])) {
        index++;
    }
    histogram->counts[index]++;
    histogram->sum += value;
}

static int durations_init(Durations *self, PyObject *args, PyObject *kwargs) {
    PyObject *bounds;
    if (!PyArg_ParseTuple(args, "O!:Durations", &PyTuple_Type, &bounds)) {
        return -1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(bounds);
    if (count > MAX_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "at most %d bucket bounds", MAX_BOUNDS);
        return -1;
    }
    memset(&self->request, 0, sizeof(Histogram));
    memset(&self->gateway, 0, sizeof(Histogram));
    memset(&self->upstream, 0, sizeof(Histogram));
    for (Py_ssize_t i = 0; i < count; i++) {
        double bound = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (bound == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        if (i > 0 && !(bound > self->bounds[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "bucket bounds must ascend");
            return -1;
        }
        self->bounds[i] = bound;
    }
    self->bounds_count = (int)count;
    return 0;
}

/* `object` as a double in `out`; 0, or -1 with the error set. */
static int double_of(PyObject *object, double *out) {
    *out = PyFloat_AsDouble(object);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *durations_observe(Durations *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "observe(total, upstream)");
        return NULL;
    }
    double total, upstream;
    if (double_of(args[0], &total) < 0 || double_of(args[1], &upstream) < 0) {
        return NULL;
    }
    add(self, &self->request, total);
    if (upstream >= 0) {
        add(self, &self->upstream, upstream);
        add(self, &self->gateway, total > upstream ? total - upstream : 0.0);
    } else {
        add(self, &self->gateway, total);
    }
    Py_RETURN_NONE;
}

static PyObject *as_list(const Durations *self, const Histogram *histogram) {
    PyObject *list = PyList_New(self->bounds_count + 2);
    if (list == NULL) {
        return NULL;
    }
    for (int i = 0; i <= self->bounds_count; i++) {
        PyObject *count = PyLong_FromUnsignedLongLong(histogram->counts[i]);
        if (count == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, count);
    }
    PyObject *sum = PyFloat_FromDouble(histogram->sum);
    if (sum == NULL) {
        Py_DECREF(list);
        return NULL;
    }
    PyList_SET_ITEM(list, self->bounds_count + 1, sum);
    return list;
}

static PyObject *durations_lists(Durations *self, PyObject *unused) {
    PyObject *request = as_list(self, &self->request);
    PyObject *gateway = request ? as_list(self, &self->gateway) : NULL;
    PyObject *upstream = gateway ? as_list(self, &self->upstream) : NULL;
    if (upstream == NULL) {
        Py_XDECREF(request);
        Py_XDECREF(gateway);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(3, request, gateway, upstream);
    Py_DECREF(request);
    Py_DECREF(gateway);
    Py_DECREF(upstream);
    return result;
}

static PyMethodDef durations_methods[] = {
    {"observe", (PyCFunction)(void (*)(void))durations_observe, METH_FASTCALL,
     "observe(total, upstream): one call's seconds (upstream < 0: it had none)."},
    {"lists", (PyCFunction)durations_lists, METH_NOARGS,
     "([*counts, sum] of request, gateway, upstream)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DurationsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tollgate.observe._durations.Durations",
    .tp_basicsize = sizeof(Durations),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Request, gateway and upstream duration histograms of one route.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)durations_init,
    .tp_methods = durations_methods,
};


/* Bucket indexes spanning at most this many use a counting array; wider ones a dict. */
#define DENSE_SPAN 4096

static PyObject *bucket_counts(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bucket_counts(values, multiplier, floor)");
        return NULL;
    }
    double multiplier, floor_value;
    if (double_of(args[1], &multiplier) < 0 || double_of(args[2], &floor_value) < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *counts = NULL;
    long long *indexes = NULL;
    long long *dense = NULL;
    if (view.itemsize != (Py_ssize_t)sizeof(double) || view.format == NULL ||
        strcmp(view.format, "d") != 0) {
        PyErr_SetString(PyExc_TypeError, "values must be a buffer of doubles");
        goto done;
    }
    const double *values = (const double *)view.buf;
    Py_ssize_t n = view.len / (Py_ssize_t)sizeof(double);
    indexes = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(long long));
    if (indexes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t indexed = 0;
    long long low = 0, high = 0;
    double total = 0.0, lowest = n > 0 ? values[0] : 0.0, highest = lowest;
    for (Py_ssize_t i = 0; i < n; i++) {
        double value = values[i];
        if (!isfinite(value) || value < 0.0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        total += value; /* in order, as Python 3.11's sum() of floats adds */
        if (value < lowest) {
            lowest = value;
        }
        if (value > highest) {
            highest = value;
        }
        if (value > floor_value) {
            long long index = (long long)ceil(log(value) * multiplier);
            if (indexed == 0 || index < low) {
                low = index;
            }
            if (indexed == 0 || index > high) {
                high = index;
            }
            indexes[indexed++] = index;
        }
    }
    counts = PyDict_New();
    if (counts == NULL) {
        goto done;
    }
    if (indexed > 0 && high - low < DENSE_SPAN) {
        dense = PyMem_Calloc((size_t)(high - low + 1), sizeof(long long));
        if (dense == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < indexed; i++) {
            dense[indexes[i] - low]++;
        }
        for (long long index = low; index <= high; index++) {
            if (dense[index - low] == 0) {
                continue;
            }
            PyObject *key = PyLong_FromLongLong(index);
            PyObject *count = key ? PyLong_FromLongLong(dense[index - low]) : NULL;
            int failed = count == NULL || PyDict_SetItem(counts, key, count) < 0;
            Py_XDECREF(key);
            Py_XDECREF(count);
            if (failed) {
                goto done;
            }
        }
    } else {
        for (Py_ssize_t i = 0; i < indexed; i++) {
            PyObject *key = PyLong_FromLongLong(indexes[i]);
            if (key == NULL) {
                goto done;
            }
            PyObject *before = PyDict_GetItemWithError(counts, key);
            long long seen = 0;
            if (before != NULL) {
                seen = PyLong_AsLongLong(before);
            } else if (PyErr_Occurred()) {
                Py_DECREF(key);
                goto done;
            }
            PyObject *count = PyLong_FromLongLong(seen + 1);
            int failed = count == NULL || PyDict_SetItem(counts, key, count) < 0;
            Py_DECREF(key);
            Py_XDECREF(count);
            if (failed) {
                goto done;
            }
        }
    }
    result = Py_BuildValue("(Onddd)", counts, n - indexed, total, lowest, highest);
done:
    Py_XDECREF(counts);
    PyMem_Free(indexes);
    PyMem_Free(dense);
    PyBuffer_Release(&view);
    return result;
}

/* Python's float floor division (floatobject.c's float_floor_div), for w > 0. */
static double floor_divide(double v, double w) {
    double mod = fmod(v, w);
    double div = (v - mod) / w;
    if (mod && ((w < 0) != (mod < 0))) {
        div -= 1.0;
    }
    if (!div) {
        return copysign(0.0, v / w);
    }
    double floored = floor(div);
    if (div - floored > 0.5) {
        floored += 1.0;
    }
    return floored;
}

static int append_double(PyObject *bytes, double value) {
    Py_ssize_t size = PyByteArray_GET_SIZE(bytes);
    if (PyByteArray_Resize(bytes, size + (Py_ssize_t)sizeof(double)) < 0) {
        return -1;
    }
    memcpy(PyByteArray_AS_STRING(bytes) + size, &value, sizeof(double));
    return 0;
}

/* A new minute: (counters, total, gateway, upstream), the counters zero. */
static PyObject *new_minute(void) {
    long long zeros[5] = {0, 0, 0, 0, 0};
    PyObject *counters = PyByteArray_FromStringAndSize((const char *)zeros, sizeof(zeros));
    PyObject *total = PyByteArray_FromStringAndSize(NULL, 0);
    PyObject *gateway = PyByteArray_FromStringAndSize(NULL, 0);
    PyObject *upstream = PyByteArray_FromStringAndSize(NULL, 0);
    PyObject *minute = NULL;
    if (counters && total && gateway && upstream) {
        minute = PyTuple_Pack(4, counters, total, gateway, upstream);
    }
    Py_XDECREF(counters);
    Py_XDECREF(total);
    Py_XDECREF(gateway);
    Py_XDECREF(upstream);
    return minute;
}

enum { F_TIME, F_SERVICE, F_ROUTE, F_CONSUMER, F_STATUS, F_IN, F_OUT, F_TOTAL, F_GATEWAY,
       F_UPSTREAM, F_COUNT };

static PyObject *aggregate(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyDict_Check(args[1]) || !PyTuple_Check(args[2]) ||
        PyTuple_GET_SIZE(args[2]) != F_COUNT) {
        PyErr_SetString(PyExc_TypeError, "aggregate(records, minutes: dict, fields: 10-tuple, empty)");
        return NULL;
    }
    PyObject *minutes = args[1];
    PyObject *empty = args[3];
    Py_ssize_t fields[F_COUNT];
    Py_ssize_t needed = 0; /* fields a record must have: the highest index, and one */
    for (int f = 0; f < F_COUNT; f++) {
        fields[f] = PyLong_AsSsize_t(PyTuple_GET_ITEM(args[2], f));
        if (fields[f] < 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "field indexes are >= 0");
            }
            return NULL;
        }
        if (fields[f] >= needed) {
            needed = fields[f] + 1;
        }
    }
    PyObject *records = PySequence_Fast(args[0], "records must be a sequence");
    if (records == NULL) {
        return NULL;
    }
    PyObject *result = NULL;
    /* The key of the record before (borrowed: the dict holds the minute, the records their
     * fields), to skip the key and the look-up when it repeats. */
    PyObject *minute = NULL, *last_service = NULL, *last_route = NULL, *last_consumer = NULL;
    double last_floor = 0.0;
    long last_klass = -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *record = items[i];
        if (!PyTuple_Check(record)) {
            PyErr_SetString(PyExc_TypeError, "a record is a tuple");
            goto done;
        }
        if (PyTuple_GET_SIZE(record) < needed) {
            PyErr_SetString(PyExc_IndexError, "a record has fewer fields than indexed");
            goto done;
        }
        double moment, total, gateway, upstream = 0.0;
        if (double_of(PyTuple_GET_ITEM(record, fields[F_TIME]), &moment) < 0) {
            goto done;
        }
        PyObject *service = PyTuple_GET_ITEM(record, fields[F_SERVICE]);
        PyObject *route = PyTuple_GET_ITEM(record, fields[F_ROUTE]);
        PyObject *consumer = PyTuple_GET_ITEM(record, fields[F_CONSUMER]);
        service = service == Py_None ? empty : service;
        route = route == Py_None ? empty : route;
        consumer = consumer == Py_None ? empty : consumer;
        long status = PyLong_AsLong(PyTuple_GET_ITEM(record, fields[F_STATUS]));
        if (status == -1 && PyErr_Occurred()) {
            goto done;
        }
        long klass = 100 <= status && status <= 599 ? status / 100 : 0;
        long long bytes_in = PyLong_AsLongLong(PyTuple_GET_ITEM(record, fields[F_IN]));
        if (bytes_in == -1 && PyErr_Occurred()) {
            goto done;
        }
        long long bytes_out = PyLong_AsLongLong(PyTuple_GET_ITEM(record, fields[F_OUT]));
        if (bytes_out == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (double_of(PyTuple_GET_ITEM(record, fields[F_TOTAL]), &total) < 0 ||
            double_of(PyTuple_GET_ITEM(record, fields[F_GATEWAY]), &gateway) < 0) {
            goto done;
        }
        PyObject *upstream_value = PyTuple_GET_ITEM(record, fields[F_UPSTREAM]);
        if (upstream_value != Py_None && double_of(upstream_value, &upstream) < 0) {
            goto done;
        }
        double floored = floor_divide(moment, 60.0);
        if (minute == NULL || floored != last_floor || klass != last_klass ||
            service != last_service || route != last_route || consumer != last_consumer) {
            PyObject *whole = PyLong_FromDouble(floored); /* int(): NaN and infinities raise */
            if (whole == NULL) {
                goto done;
            }
            PyObject *sixty = PyLong_FromLong(60);
            PyObject *start = sixty ? PyNumber_Multiply(whole, sixty) : NULL;
            Py_DECREF(whole);
            Py_XDECREF(sixty);
            PyObject *klass_object = start ? PyLong_FromLong(klass) : NULL;
            PyObject *key = klass_object ? PyTuple_Pack(5, start, service, route, consumer,
                                                        klass_object)
                                         : NULL;
            Py_XDECREF(start);
            Py_XDECREF(klass_object);
            if (key == NULL) {
                goto done;
            }
            minute = PyDict_GetItemWithError(minutes, key);
            if (minute == NULL) {
                if (PyErr_Occurred()) {
                    Py_DECREF(key);
                    goto done;
                }
                PyObject *made = new_minute();
                int failed = made == NULL || PyDict_SetItem(minutes, key, made) < 0;
                Py_XDECREF(made); /* the dict holds it */
                if (failed) {
                    Py_DECREF(key);
                    goto done;
                }
                minute = made;
            }
            Py_DECREF(key);
            if (!PyTuple_Check(minute) || PyTuple_GET_SIZE(minute) != 4) {
                PyErr_SetString(PyExc_TypeError, "a minute is a tuple of four bytearrays");
                goto done;
            }
            for (int part = 0; part < 4; part++) {
                if (!PyByteArray_Check(PyTuple_GET_ITEM(minute, part))) {
                    PyErr_SetString(PyExc_TypeError, "a minute is a tuple of four bytearrays");
                    goto done;
                }
            }
            if (PyByteArray_GET_SIZE(PyTuple_GET_ITEM(minute, 0)) != 5 * sizeof(long long)) {
                PyErr_SetString(PyExc_ValueError, "a minute's counters are five int64");
                goto done;
            }
            last_floor = floored;
            last_klass = klass;
            last_service = service;
            last_route = route;
            last_consumer = consumer;
        }
        /* Added as unsigned (two's complement, as int64 stores them): no overflow is
         * undefined, and no minute counts 2**63 bytes. */
        uint64_t counters[5];
        char *stored = PyByteArray_AS_STRING(PyTuple_GET_ITEM(minute, 0));
        memcpy(counters, stored, sizeof(counters));
        counters[0] += 1;
        counters[1] += klass == 4;
        counters[2] += klass == 5;
        counters[3] += (uint64_t)bytes_in;
        counters[4] += (uint64_t)bytes_out;
        memcpy(stored, counters, sizeof(counters));
        if (append_double(PyTuple_GET_ITEM(minute, 1), total) < 0 ||
            append_double(PyTuple_GET_ITEM(minute, 2), gateway) < 0 ||
            (upstream_value != Py_None &&
             append_double(PyTuple_GET_ITEM(minute, 3), upstream) < 0)) {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(records);
    return result;
}

static PyMethodDef module_methods[] = {
    {"bucket_counts", (PyCFunction)(void (*)(void))bucket_counts, METH_FASTCALL,
     "bucket_counts(values, multiplier, floor) -> ({bucket: count}, zeros)."},
    {"aggregate", (PyCFunction)(void (*)(void))aggregate, METH_FASTCALL,
     "aggregate(records, minutes, fields, empty): count records in their minute aggregates."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_durations",
    "Duration histograms of the metrics, counted in C (see observe/metrics.py), and the "
    "buckets of the rollups' latency sketches (see observe/sketch.py).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__durations(void) {
    if (PyType_Ready(&DurationsType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&DurationsType);
    if (PyModule_AddObject(module, "Durations", (PyObject *)&DurationsType) < 0) {
        Py_DECREF(&DurationsType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
