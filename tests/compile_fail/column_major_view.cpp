// expect: moe::MatrixView wraps row-major memory only
#include <moe/backend/cpu.hpp>
#include <moe/moe.hpp>

int main() {
  Eigen::MatrixXf column_major(3, 4);
  moe::ConstMatrixView<float> v = column_major;  // views are row-major: this must not compile
  (void)v;
}
