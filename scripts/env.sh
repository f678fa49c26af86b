# Sourced by the scripts: the CUDA toolkit, where installed, on PATH for Meson to find nvcc.
if [ -d /usr/local/cuda/bin ]; then
  case ":$PATH:" in *":/usr/local/cuda/bin:"*) ;; *) export PATH="/usr/local/cuda/bin:$PATH" ;; esac
fi
