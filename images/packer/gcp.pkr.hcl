# A GCE image with the runner: `packer build images/packer/gcp.pkr.hcl` (or `make image-gcp`).
# Credentials: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, or
# `gcloud auth application-default login`); project from project_id / CLOUDSDK_CORE_PROJECT.
# Written for Packer 1.6 (Debian's; the googlecompute builder is built in). With Packer
# >= 1.7, run `packer plugins install github.com/hashicorp/googlecompute` first.

variable "project_id" {
  type    = string
  default = env("CLOUDSDK_CORE_PROJECT")
}

variable "zone" {
  type    = string
  default = "us-central1-a"
}

variable "machine_type" {
  description = "Builder machine; the image runs on any type (one with a GPU for gpu = true)."
  type        = string
  default     = "e2-standard-2"
}

variable "base_image_family" {
  description = "Base image family: Debian 12 (arm64: debian-12-arm64, with a t2a machine)."
  type        = string
  default     = "debian-12"
}

variable "base_image_project" {
  type    = string
  default = "debian-cloud"
}

variable "ssh_username" {
  type    = string
  default = "packer"
}

variable "network" {
  type    = string
  default = ""
}

variable "subnetwork" {
  type    = string
  default = ""
}

variable "service_account_email" {
  description = "Service account of the builder, e.g. to read gs:// prebuild_specs; empty: the default."
  type        = string
  default     = ""
}

variable "disk_size_gb" {
  type    = number
  default = 16
}

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
  type    = string
  default = "gcs"
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
  variant = var.gpu ? "-gpu" : ""
  version = var.runner_wheel != "" ? regex_replace(basename(var.runner_wheel), "^prefect_vm_runner-([^-]+)-.*$", "$1") : var.runner_version
  name    = "${var.image_name_prefix}${local.variant}-${regex_replace(local.version, "[^a-zA-Z0-9-]", "-")}-${formatdate("YYYYMMDDhhmmss", timestamp())}"
  # Packer 1.6 has no conditional provisioner: without a wheel, a file of images/ stands in.
  wheel_source = var.runner_wheel != "" ? var.runner_wheel : "${path.root}/../systemd/prefect-vm-runner.service"
  staging      = "/tmp/prefect-vm-runner-image"
  provision_env = [
    "PVR_FILES=${local.staging}",
    "PVR_RUNNER_WHEEL=${var.runner_wheel != "" ? "${local.staging}/${basename(var.runner_wheel)}" : ""}",
    "PVR_RUNNER_VERSION=${var.runner_version}",
    "PVR_RUNNER_EXTRAS=${var.runner_extras}",
    "PVR_INDEX_URL=${var.index_url}",
    "PVR_PREBUILD_SPECS=${join(" ", var.prebuild_specs)}",
    "PVR_GPU=${var.gpu}",
    "PVR_PODMAN=${var.podman}",
  ]
}

source "googlecompute" "runner" {
  project_id              = var.project_id
  zone                    = var.zone
  machine_type            = var.machine_type
  source_image_family     = var.base_image_family
  source_image_project_id = [var.base_image_project]
  ssh_username            = var.ssh_username
  network                 = var.network
  subnetwork              = var.subnetwork
  service_account_email   = var.service_account_email
  disk_size               = var.disk_size_gb
  disk_type               = "pd-balanced"
  image_name              = local.name
  image_family            = "${var.image_name_prefix}${local.variant}"
  image_description       = "Debian 12 with prefect-vm-runner ${local.version}${local.variant}"
  image_labels = {
    prefect-vm-runner = regex_replace(lower(local.version), "[^a-z0-9_-]", "-")
    gpu               = var.gpu ? "true" : "false"
  }
}

build {
  sources = ["source.googlecompute.runner"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}"]
  }

  # images/ (systemd unit, GCE user-data step) and the wheel, if any.
  provisioner "file" {
    source      = "${path.root}/../"
    destination = local.staging
  }

  provisioner "file" {
    source      = local.wheel_source
    destination = "${local.staging}/${basename(local.wheel_source)}"
  }

  provisioner "shell" {
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = concat(local.provision_env, var.extra_env)
    scripts = [
      "${path.root}/../provision/base.sh",
      "${path.root}/../provision/nvidia.sh",
      "${path.root}/../provision/runner.sh",
      "${path.root}/../provision/cleanup.sh",
    ]
  }
}
