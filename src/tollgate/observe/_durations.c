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
 * lists(): ([*counts, sum] of request, gateway, upstream), as Histogram.to_list gives them. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

static PyObject *durations_observe(Durations *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "observe(total, upstream)");
        return NULL;
    }
    double total = PyFloat_AsDouble(args[0]);
    if (total == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double upstream = PyFloat_AsDouble(args[1]);
    if (upstream == -1.0 && PyErr_Occurred()) {
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

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_durations",
    "Duration histograms of the metrics, counted in C (see observe/metrics.py).", -1,
    NULL, NULL, NULL, NULL, NULL,
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
