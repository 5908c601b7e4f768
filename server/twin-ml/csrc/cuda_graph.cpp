//! twin-ml's CUDA shim: libtorch's CUDA graphs (at::cuda::CUDAGraph) and the TF32 switches,
//! behind a C interface that src/cuda_graph.rs loads at run time.
//!
//! build.rs compiles this file into a shared library linked against libtorch_cuda; the Rust side
//! embeds it and opens it only after device.rs has loaded libtorch_cuda, so binaries keep no
//! link-time dependency on CUDA and run unchanged on machines without it. Every entry point
//! catches C++ exceptions (c10::Error above all) and returns them as text: nothing unwinds
//! across the C boundary.

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>

namespace {

// Bumped whenever a signature below changes; the Rust side refuses a shim of another version.
constexpr int kShimVersion = 1;

void write_error(char* buf, size_t len, const char* what) {
  if (buf == nullptr || len == 0) {
    return;
  }
  std::snprintf(buf, len, "%s", what);
}

// Runs `f`, turning any exception into 1 and its message in `err`.
template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    write_error(err, err_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown C++ exception");
  }
  return 1;
}

// One captured graph with the side stream it is warmed up and captured on: CUDA cannot capture
// the legacy default stream, and warming up on the capturing stream makes libraries allocate
// their per-stream workspaces (cuBLAS) before capture rather than during it.
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  std::optional<c10::cuda::CUDAStream> previous;

  explicit Graph(c10::DeviceIndex device)
      : graph(/*keep_graph=*/false), side(c10::cuda::getStreamFromPool(false, device)) {}

  void enter() {
    if (previous) {
      return;
    }
    c10::cuda::device_synchronize();
    previous = c10::cuda::getCurrentCUDAStream(side.device_index());
    c10::cuda::setCurrentCUDAStream(side);
  }

  void leave() {
    if (!previous) {
      return;
    }
    c10::cuda::setCurrentCUDAStream(*previous);
    previous.reset();
    c10::cuda::device_synchronize();
  }
};

}  // namespace

extern "C" {

int twin_cg_version() { return kShimVersion; }

// TF32 for cuBLAS matmuls and cuDNN convolutions (libtorch turns it on for cuDNN by default).
int twin_cg_set_tf32(int cublas, int cudnn, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::globalContext().setAllowTF32CuBLAS(cublas != 0);
    at::globalContext().setAllowTF32CuDNN(cudnn != 0);
  });
}

// A new, empty graph on `device`, or null with the reason in `err`.
void* twin_cg_new(int device, char* err, size_t err_len) {
  Graph* out = nullptr;
  guarded(err, err_len, [&] { out = new Graph(static_cast<c10::DeviceIndex>(device)); });
  return out;
}

// Makes the graph's side stream current on this thread (waiting for all work first).
int twin_cg_enter(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Graph*>(g)->enter(); });
}

// Restores the stream that was current before twin_cg_enter (waiting for all work first).
int twin_cg_leave(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Graph*>(g)->leave(); });
}

// Starts capturing this thread's work on the side stream (entering it if needed). Thread-local
// capture mode: another thread's CUDA calls neither join nor break this capture.
int twin_cg_capture_begin(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* graph = static_cast<Graph*>(g);
    graph->enter();
    graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  });
}

// Ends the capture and instantiates the graph, then leaves the side stream, whether or not
// capture succeeded (a failed capture must not leave this thread on the side stream).
int twin_cg_capture_end(void* g, char* err, size_t err_len) {
  auto* graph = static_cast<Graph*>(g);
  int rc = guarded(err, err_len, [&] { graph->graph.capture_end(); });
  char ignored[8];
  guarded(ignored, sizeof ignored, [&] { graph->leave(); });
  return rc;
}

// Launches the captured work on the current stream.
int twin_cg_replay(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Graph*>(g)->graph.replay(); });
}

void twin_cg_free(void* g) {
  char ignored[8];
  guarded(ignored, sizeof ignored, [&] { delete static_cast<Graph*>(g); });
}

}  // extern "C"
