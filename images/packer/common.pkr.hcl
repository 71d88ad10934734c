# What the three images share: the runner, its options, the image's name.
#
# The templates are one Packer configuration (this directory): common.pkr.hcl,
# build.pkr.hcl (the build and its provisioners), and one file per cloud with its
# variables and source. Build one cloud's image with `-only`:
#
#   packer build -only=amazon-ebs.runner images/packer      (make image-aws)
#   packer build -only=googlecompute.runner images/packer   (make image-gcp)
#   packer build -only=azure-arm.runner images/packer       (make image-azure)
#
# Written for Packer 1.6 (Debian's; its builders are built in). With Packer >= 1.7, install
# the plugins first: images/README.md.

variable "runner_version" {
  description = "prefect-vm-runner version from the package index (empty or latest: the newest)."
  type        = string
  default     = "0.1.0"
}

variable "runner_wheel" {
  description = "A local wheel of prefect-vm-runner to install instead of runner_version."
  type        = string
  default     = ""
}

variable "runner_extras" {
  description = "The runner's extras, comma-separated; empty: the cloud's own (s3, gcs, azure)."
  type        = string
  default     = ""
}

variable "index_url" {
  description = "Package index for the runner and prebuilt envs; empty: PyPI."
  type        = string
  default     = ""
  sensitive   = true
}

variable "prebuild_specs" {
  description = "Env specs (URLs as `env push` prints them) built into the image."
  type        = list(string)
  default     = []
}

variable "gpu" {
  description = "Install the NVIDIA driver (Debian non-free, headless)."
  type        = bool
  default     = false
}

variable "podman" {
  description = "Install podman, for flows that run in a container image."
  type        = bool
  default     = false
}

variable "disk_size_gb" {
  type    = number
  default = 16
}

variable "extra_env" {
  description = "More KEY=VALUE for the provisioning scripts (UV_*, SSL_CERT_FILE...)."
  type        = list(string)
  default     = []
}

variable "image_name_prefix" {
  type    = string
  default = "prefect-vm-runner"
}

locals {
  # The runner's extra for each cloud's storage, unless runner_extras says otherwise.
  default_extras = { "amazon-ebs" = "s3", "googlecompute" = "gcs", "azure-arm" = "azure" }
  variant        = var.gpu ? "-gpu" : ""
  version        = var.runner_wheel != "" ? regex_replace(basename(var.runner_wheel), "^prefect_vm_runner-([^-]+)-.*$", "$1") : var.runner_version
  name           = "${var.image_name_prefix}${local.variant}-${regex_replace(local.version, "[^a-zA-Z0-9-]", "-")}-${formatdate("YYYYMMDDhhmmss", timestamp())}"
  # Packer 1.6 has no conditional provisioner: without a wheel, a file of images/ stands in.
  wheel_source = var.runner_wheel != "" ? var.runner_wheel : "${path.root}/../systemd/prefect-vm-runner.service"
  staging      = "/tmp/prefect-vm-runner-image"
  provision_env = [
    "PVR_FILES=${local.staging}",
    "PVR_RUNNER_WHEEL=${var.runner_wheel != "" ? "${local.staging}/${basename(var.runner_wheel)}" : ""}",
    "PVR_RUNNER_VERSION=${var.runner_version}",
    "PVR_INDEX_URL=${var.index_url}",
    "PVR_PREBUILD_SPECS=${join(" ", var.prebuild_specs)}",
    "PVR_GPU=${var.gpu}",
    "PVR_PODMAN=${var.podman}",
  ]
}
