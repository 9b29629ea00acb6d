// Small programs of kips' images, built by scripts/images.sh (standard library only, CGO off,
// static): the pause image, the test workloads, and the tool that writes image tarballs.
module kips.dev/images

go 1.26.0
