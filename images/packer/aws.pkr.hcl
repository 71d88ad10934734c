# An AMI with the runner: `packer build images/packer/aws.pkr.hcl` (or `make image-aws`).
# Credentials: the AWS SDK's usual chain (AWS_PROFILE, AWS_ACCESS_KEY_ID..., SSO, a role).
# Written for Packer 1.6 (Debian's; the amazon builder is built in). With Packer >= 1.7,
# run `packer plugins install github.com/hashicorp/amazon` (or add a required_plugins
# block) first: images/README.md.

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  description = "Builder instance; the image runs on any type (a GPU one for gpu = true)."
  type        = string
  default     = "t3.medium"
}

variable "base_image_name" {
  description = "AMI name filter of the base image: Debian 12 (arm64: debian-12-arm64-*)."
  type        = string
  default     = "debian-12-amd64-*"
}

variable "base_image_owner" {
  description = "Owner of the base AMI: 136693071363 is Debian's."
  type        = string
  default     = "136693071363"
}

variable "ssh_username" {
  type    = string
  default = "admin"
}

variable "subnet_id" {
  description = "Subnet of the builder instance; empty: the default VPC."
  type        = string
  default     = ""
}

variable "iam_instance_profile" {
  description = "Instance profile of the builder, e.g. to read s3:// prebuild_specs."
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
  default = "s3"
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

source "amazon-ebs" "runner" {
  region               = var.region
  instance_type        = var.instance_type
  ssh_username         = var.ssh_username
  subnet_id            = var.subnet_id
  iam_instance_profile = var.iam_instance_profile
  ami_name             = local.name
  ami_description      = "Debian 12 with prefect-vm-runner ${local.version}${local.variant}"
  ena_support          = true

  source_ami_filter {
    filters = {
      name                = var.base_image_name
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.base_image_owner]
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.disk_size_gb
    volume_type           = "gp3"
    iops                  = 3000 # gp3's baseline; Packer 1.6 wants both set
    throughput            = 125
    delete_on_termination = true
  }

  tags = {
    Name                         = local.name
    "prefect-vm-runner:version"  = local.version
    "prefect-vm-runner:gpu"      = var.gpu
    "prefect-vm-runner:base-ami" = var.base_image_name
  }
}

build {
  sources = ["source.amazon-ebs.runner"]

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
