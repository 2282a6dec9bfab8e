/* Decode one region of a JPEG: the rows and columns a training crop needs, not the whole photo.
 *
 * Pillow decodes every pixel of a JPEG. libjpeg-turbo can skip the rows above a region (jpeg_skip_scanlines: no
 * inverse DCT, upsampling or color conversion there), restrict each row to the region's columns (jpeg_crop_scanline)
 * and stop after the region's last row, as TensorFlow's decode_and_crop_jpeg does for the Inception crop. Pillow
 * does not expose these calls, so this module does, for vit_hf.data. Within the region the pixels are those of a
 * full decode, bit for bit (tests/test_jpeg.py), apart from its first and last column, where the upsampling of
 * subsampled chroma has no neighbour: the caller asks for one column more on each side.
 *
 * decode_region(data, out, scale, top, bottom, left, right) -> (x0, width)
 *   data: the JPEG file's bytes; out: a writable buffer of at least (bottom - top) * output_width * 4 bytes;
 *   scale: 1, 2, 4 or 8, the decode at 1/scale size (libjpeg's DCT scaling, as PIL's Image.draft);
 *   top, bottom, left, right: the region in pixels of that output. The rows [top, bottom) are written to out as
 *   RGBX (4 bytes a pixel), each of the returned width, which starts at column x0 <= left (libjpeg aligns it to its
 *   blocks) and reaches right at least. Gray JPEGs come out as RGB with equal channels, as PIL converts them.
 *   Raises OSError with libjpeg's message for a broken file, or "image file is truncated" where the data ends
 *   before the end-of-image marker (PIL's message, for the same files a full decode refuses); ValueError for
 *   color spaces other than gray, YCbCr and RGB (CMYK: the caller decodes those with PIL).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#ifndef JCS_EXTENSIONS
#error "libjpeg-turbo's jpeglib.h is needed (JCS_EXT_RGBX, jpeg_skip_scanlines, jpeg_crop_scanline)"
#endif

typedef struct {
    const unsigned char *data;
    size_t size;
    unsigned char *out;
    size_t out_size;
    unsigned int scale, top, bottom, left, right;
    JDIMENSION x0, width;
    int truncated;
    int failure; /* 0: decoded; 1: libjpeg error (message); 2: truncated; 3: color space; 4: region; 5: out */
    char message[JMSG_LENGTH_MAX];
} job;

/* Kept in the job, not in run()'s frame, what the error and warning handlers set: longjmp leaves run()'s own
   variables indeterminate where they changed after setjmp. */
typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    job *job;
} error_manager;

static void
raise_error(j_common_ptr cinfo)
{
    longjmp(((error_manager *)cinfo->err)->jump, 1);
}

static void
note_warning(j_common_ptr cinfo, int level)
{
    /* Warnings (level -1) are corrupt data libjpeg decodes through, as PIL does; only the end of the data counts. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        ((error_manager *)cinfo->err)->job->truncated = 1;
    }
}

/* Whether the end-of-image marker follows `from` (the first scan's data): a full decode reads up to it. */
static int
has_end_marker(const unsigned char *from, const unsigned char *end)
{
    /* In entropy-coded data 0xFF is followed by 0x00 or a restart marker, so 0xFF 0xD9 there is the end. */
    for (const unsigned char *p = end - 1; p > from; p--) {
        if (p[0] == 0xD9 && p[-1] == 0xFF) {
            return 1;
        }
    }
    return 0;
}

/* The decode, without the GIL: it touches no Python object. */
static void
run(job *j)
{
    struct jpeg_decompress_struct cinfo;
    error_manager err;
    JSAMPROW row;
    const unsigned char *scan;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = raise_error;
    err.pub.emit_message = note_warning;
    err.job = j;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        (*cinfo.err->format_message)((j_common_ptr)&cinfo, j->message);
        j->failure = j->truncated ? 2 : 1;
        jpeg_destroy_decompress(&cinfo);
        return;
    }
    jpeg_mem_src(&cinfo, j->data, (unsigned long)j->size);
    jpeg_read_header(&cinfo, TRUE);
    scan = cinfo.src->next_input_byte; /* past the first scan's header; an EXIF thumbnail's marker lies before */
    if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
        cinfo.jpeg_color_space != JCS_RGB) {
        j->failure = 3;
        jpeg_destroy_decompress(&cinfo);
        return;
    }
    cinfo.out_color_space = JCS_EXT_RGBX;
    cinfo.scale_num = 1;
    cinfo.scale_denom = j->scale;
    jpeg_start_decompress(&cinfo);
    if (j->top >= j->bottom || j->bottom > cinfo.output_height || j->left >= j->right ||
        j->right > cinfo.output_width) {
        j->failure = 4;
        jpeg_destroy_decompress(&cinfo);
        return;
    }
    j->x0 = j->left;
    j->width = j->right - j->left;
    if (j->width < cinfo.output_width) {
        jpeg_crop_scanline(&cinfo, &j->x0, &j->width);
    }
    if ((size_t)(j->bottom - j->top) * j->width * 4 > j->out_size) {
        j->failure = 5;
        jpeg_destroy_decompress(&cinfo);
        return;
    }
    if (j->top > 0 && jpeg_skip_scanlines(&cinfo, j->top) != j->top) {
        j->truncated = 1;
    }
    for (unsigned int y = j->top; y < j->bottom && !j->truncated; y++) {
        row = j->out + (size_t)(y - j->top) * j->width * 4;
        if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
            j->truncated = 1;
        }
    }
    if (!j->truncated && !has_end_marker(scan, j->data + j->size)) {
        j->truncated = 1;
    }
    j->failure = j->truncated ? 2 : 0;
    jpeg_destroy_decompress(&cinfo);
}

static PyObject *
decode_region(PyObject *module, PyObject *args)
{
    Py_buffer data, out;
    job j = {0};

    if (!PyArg_ParseTuple(args, "y*w*IIIII", &data, &out, &j.scale, &j.top, &j.bottom, &j.left, &j.right)) {
        return NULL;
    }
    j.data = data.buf;
    j.size = (size_t)data.len;
    j.out = out.buf;
    j.out_size = (size_t)out.len;
    if (j.scale != 1 && j.scale != 2 && j.scale != 4 && j.scale != 8) {
        j.failure = 4;
    } else {
        Py_BEGIN_ALLOW_THREADS run(&j);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    switch (j.failure) {
        case 0:
            return Py_BuildValue("(II)", j.x0, j.width);
        case 1:
            PyErr_SetString(PyExc_OSError, j.message);
            return NULL;
        case 2:
            PyErr_SetString(PyExc_OSError, "image file is truncated");
            return NULL;
        case 3:
            PyErr_SetString(PyExc_ValueError, "not a gray, YCbCr or RGB JPEG");
            return NULL;
        case 4:
            PyErr_SetString(PyExc_ValueError, "scale or region outside the image");
            return NULL;
        default:
            PyErr_SetString(PyExc_ValueError, "output buffer too small for the region");
            return NULL;
    }
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS, "Decode rows [top, bottom) and columns [left, right) of a JPEG."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vit_hf.data._jpeg", "Region decoding of JPEGs with libjpeg-turbo.", -1, methods,
};

PyMODINIT_FUNC
PyInit__jpeg(void)
{
    return PyModule_Create(&module);
}
