/* cuBLASLt matmuls with the GELU epilogues, for training.gelu_epilogue (trainables/gelu_lt.py builds this file
 * into a shared library with the system C compiler and calls it through ctypes; no PyTorch headers, so it
 * builds in about a second).
 *
 * Column-major, as cuBLASLt sees memory. A row-major PyTorch tensor X [rows, cols] is the column-major matrix
 * X^T [cols, rows] with leading dimension cols. The MLP's two products, row-major:
 *   forward   act = gelu(pre), pre = x W1^T + b1      x [M, d], W1 [f, d], b1 [f]
 *   backward  dpre = (dy W2) * gelu'(pre)               dy [M, e], W2 [e, f]
 * column-major: D [f, M] = op(A) B with B = x^T [d, M] (or dy^T [e, M]) and
 *   forward:  A = W1 stored as [d, f] (ld d), op = T;  epilogue GELU_AUX_BIAS: D = gelu(AB + bias), aux = AB + bias
 *   backward: A = W2 stored as [f, e] (ld f), op = N;  epilogue DGELU: D = AB * gelu'(aux).
 * b1's gradient (dpre's row sums): cuBLASLt's DGELU_BGRAD, which sums it in the backward's first matmul, ran
 * 3.47 ms against 1.22 ms for DGELU at ViT-B/14's batch 512 on the H100 (benchmarks/results/
 * gpu_2026-11-28-twelfth.md); lt_wgrad_bgradb below sums it in the weight-gradient matmul instead.
 * cuBLASLt's GELU is the tanh form (PyTorch's gelu(approximate="tanh")).
 *
 * Every call runs the heuristic's choice number `which` (0: its first) of up to 16 for the shape (the answers
 * are cached per shape below, since asking costs tens of microseconds of host time), on the caller's stream
 * with the caller's workspace, so it works under CUDA graph capture. Returns a cublasStatus_t (0 is success;
 * NOT_SUPPORTED also where `which` is past the choices the heuristic gave). */
#include <cublasLt.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* One handle and one cache per process, for the one GPU a trial's process uses; the lock guards both (ctypes
 * releases the GIL, and autograd runs the backward on its own thread). */
static cublasLtHandle_t handle;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

const char *lt_status_string(int status) { return cublasLtGetStatusString((cublasStatus_t)status); }

#define CHECK(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { st = s_; goto done; } } while (0)

/* A small cache of heuristic answers: (epilogue, which fixes the operations and leading dimensions, m, n, k,
 * workspace) -> up to ALGOS algos, best first. */
#define ALGOS 16
typedef struct { int epi, m, n, k; size_t ws; int used, count; cublasLtMatmulAlgo_t algo[ALGOS]; } entry_t;
#define CACHE 64
static entry_t cache[CACHE];

static int matmul(cublasLtEpilogue_t epi, cublasOperation_t ta, int m, int n, int k,
                  const void *A, int lda, const void *B, int ldb, void *D, int ldd,
                  void *bias, void *aux, int64_t ldaux, void *ws, size_t ws_size, void *stream, int which) {
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, ld = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasOperation_t tb = epi == CUBLASLT_EPILOGUE_BGRADB ? CUBLAS_OP_T : CUBLAS_OP_N;
    float one = 1.0f, zero = 0.0f;
    cublasLtMatmulAlgo_t algo;
    int i, hit = -1, locked = 0;

    pthread_mutex_lock(&lock);
    locked = 1;
    if (!handle) CHECK(cublasLtCreate(&handle));
    CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    if (bias) CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    if (aux) {
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ldaux, sizeof(ldaux)));
    }
    CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda));
    CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb));
    CHECK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, m, n, ldd));

    for (i = 0; i < CACHE; i++)
        if (cache[i].used && cache[i].epi == (int)epi && cache[i].m == m && cache[i].n == n && cache[i].k == k
            && cache[i].ws == ws_size) { hit = i; break; }
    if (hit < 0) {
        cublasLtMatmulHeuristicResult_t res[ALGOS];
        int found = 0, j;
        memset(res, 0, sizeof(res));
        CHECK(cublasLtMatmulPreferenceCreate(&pref));
        CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size,
                                                   sizeof(ws_size)));
        CHECK(cublasLtMatmulAlgoGetHeuristic(handle, op, la, lb, ld, ld, pref, ALGOS, res, &found));
        if (found == 0) { st = CUBLAS_STATUS_NOT_SUPPORTED; goto done; }
        for (i = 0; i < CACHE && cache[i].used; i++) ;
        if (i == CACHE) i = 0;  /* full: overwrite the first (a handful of shapes per model in practice) */
        cache[i].epi = (int)epi; cache[i].m = m; cache[i].n = n; cache[i].k = k; cache[i].ws = ws_size;
        for (j = 0; j < found; j++) cache[i].algo[j] = res[j].algo;
        cache[i].count = found; cache[i].used = 1;
        hit = i;
    }
    if (which < 0 || which >= cache[hit].count) { st = CUBLAS_STATUS_NOT_SUPPORTED; goto done; }
    algo = cache[hit].algo[which];
    pthread_mutex_unlock(&lock);
    locked = 0;
    CHECK(cublasLtMatmul(handle, op, &one, A, la, B, lb, &zero, D, ld, D, ld, &algo, ws, ws_size,
                         (cudaStream_t)stream));
done:
    if (locked) pthread_mutex_unlock(&lock);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    return (int)st;
}

/* act, pre [M, f] = gelu(x W1^T + b1), x W1^T + b1 (all bf16, row-major, contiguous). */
int lt_linear_gelu(int M, int d, int f, const void *x, const void *w1, void *b1, void *act, void *pre,
                   void *ws, size_t ws_size, void *stream, int which) {
    return matmul(CUBLASLT_EPILOGUE_GELU_AUX_BIAS, CUBLAS_OP_T, f, M, d, w1, d, x, d, act, f, b1, pre, f,
                  ws, ws_size, stream, which);
}

/* dpre [M, f] = (dy W2) * gelu'(pre) (dy [M, e], W2 [e, f]); the bias gradient left to the caller. */
int lt_dgelu(int M, int e, int f, const void *dy, const void *w2, void *pre, void *dpre, void *unused,
             void *ws, size_t ws_size, void *stream, int which) {
    (void)unused;
    return matmul(CUBLASLT_EPILOGUE_DGELU, CUBLAS_OP_N, f, M, e, w2, f, dy, e, dpre, f, NULL, pre, f,
                  ws, ws_size, stream, which);
}

/* The weight and bias gradients of a linear layer z = x W^T + b from dz [M, o] and x [M, i]: dw [o, i] = dz^T x and
 * db [o] = dz summed over rows, in one matmul (column-major D [i, o] = x^T-as-stored [i, M] times op(B) [M, o],
 * B = dz stored [o, M] (ld o) and transposed; the BGRADB epilogue sums op(B) over the product's k = M). */
int lt_wgrad_bgradb(int M, int i, int o, const void *dz, const void *x, void *dw, void *db, void *unused,
                    void *ws, size_t ws_size, void *stream, int which) {
    (void)unused;
    return matmul(CUBLASLT_EPILOGUE_BGRADB, CUBLAS_OP_N, i, o, M, x, i, dz, o, dw, i, db, NULL, 0,
                  ws, ws_size, stream, which);
}
