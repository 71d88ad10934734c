# An Azure managed image with the runner: `packer build images/packer/azure.pkr.hcl` (or
# `make image-azure`). Credentials: a service principal (ARM_CLIENT_ID, ARM_CLIENT_SECRET,
# ARM_TENANT_ID), `az login` with use_azure_cli_auth = true, or the builder's managed
# identity; subscription from ARM_SUBSCRIPTION_ID. The resource group must exist.
# Written for Packer 1.6 (Debian's; the azure builder is built in). With Packer >= 1.7,
# run `packer plugins install github.com/hashicorp/azure` first.

variable "subscription_id" {
  type    = string
  default = env("ARM_SUBSCRIPTION_ID")
}

variable "tenant_id" {
  type    = string
  default = env("ARM_TENANT_ID")
}

variable "client_id" {
  type    = string
  default = env("ARM_CLIENT_ID")
}

variable "client_secret" {
  type      = string
  default   = env("ARM_CLIENT_SECRET")
  sensitive = true
}

variable "use_azure_cli_auth" {
  type    = bool
  default = false
}

variable "location" {
  type    = string
  default = "eastus"
}

variable "vm_size" {
  description = "Builder VM size; the image runs on any size (an N-series one for gpu = true)."
  type        = string
  default     = "Standard_D2s_v5"
}

variable "base_image_publisher" {
  type    = string
  default = "Debian"
}

variable "base_image_offer" {
  type    = string
  default = "debian-12"
}

variable "base_image_sku" {
  description = "Debian 12, Hyper-V generation 2 (arm64: 12-arm64, with an arm64 vm_size)."
  type        = string
  default     = "12-gen2"
}

variable "resource_group" {
  description = "Existing resource group that receives the managed image."
  type        = string
  default     = "prefect-vm-runner-images"
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
  default = "azure"
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

source "azure-arm" "runner" {
  subscription_id    = var.subscription_id
  tenant_id          = var.tenant_id
  client_id          = var.client_id
  client_secret      = var.client_secret
  use_azure_cli_auth = var.use_azure_cli_auth

  location        = var.location
  vm_size         = var.vm_size
  os_type         = "Linux"
  image_publisher = var.base_image_publisher
  image_offer     = var.base_image_offer
  image_sku       = var.base_image_sku
  os_disk_size_gb = var.disk_size_gb

  managed_image_name                = local.name
  managed_image_resource_group_name = var.resource_group

  azure_tags = {
    "prefect-vm-runner-version" = local.version
    "prefect-vm-runner-gpu"     = var.gpu ? "true" : "false"
  }
}

build {
  sources = ["source.azure-arm.runner"]

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

  # Azure's generalization, last: removes the build user (so no cleanup of this script).
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    inline          = ["if command -v waagent >/dev/null; then waagent -force -deprovision+user; fi", "sync"]
    inline_shebang  = "/bin/sh -eu"
    skip_clean      = true
  }
}
