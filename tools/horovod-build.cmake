# CMake toolchain file for building Horovod 0.28.1 against torch >= 2.14.
#
# Horovod compiles its torch extension with -std=c++14, but ATen's headers in
# torch 2.14 refuse anything older than C++20. The flag CMake emits for a C++14
# target comes from CMAKE_CXX14_STANDARD_COMPILE_OPTION, which the compiler
# module sets during project(); a toolchain file runs too early to override it.
# So this file runs twice: first as the toolchain file (it registers itself as
# the project-include file), then after every project() call, where it maps the
# C++14 option to C++20.
if(DEFINED CMAKE_CXX14_STANDARD_COMPILE_OPTION)
  set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++20")
else()
  set(CMAKE_PROJECT_INCLUDE "${CMAKE_CURRENT_LIST_FILE}")
endif()
