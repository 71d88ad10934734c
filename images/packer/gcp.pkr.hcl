# The GCE image: `make image-gcp`, i.e. `packer build -only=googlecompute.runner
# images/packer`. Credentials: Application Default Credentials
# (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`); project
# from project_id / CLOUDSDK_CORE_PROJECT. Shared variables and the build:
# common.pkr.hcl, build.pkr.hcl.

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

source "googlecompute" "runner" {
  project_id              = var.project_id
  zone                    = var.zone
  machine_type            = var.machine_type
  source_image_family     = var.base_image_family
  source_image_project_id = [var.base_image_project]
  ssh_username            = "packer"
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
