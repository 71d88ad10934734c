# The AWS image (an AMI): `make image-aws`, i.e. `packer build -only=amazon-ebs.runner
# images/packer`. Credentials: the AWS SDK's usual chain (AWS_PROFILE,
# AWS_ACCESS_KEY_ID..., SSO, a role). Shared variables and the build: common.pkr.hcl,
# build.pkr.hcl.

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

source "amazon-ebs" "runner" {
  region               = var.region
  instance_type        = var.instance_type
  ssh_username         = "admin" # Debian's AMIs
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
