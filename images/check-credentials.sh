#!/bin/sh
# Fail fast, in one line, when `packer build` for CLOUD (aws, gcp, azure) has no
# credentials to use; what counts is what each Packer builder reads by itself.
set -eu
cloud=${1:?usage: check-credentials.sh aws|gcp|azure}

fail() {
    echo "make image-$cloud: $*" >&2
    exit 1
}
any() {  # any of these variables set?
    for name in "$@"; do
        eval "value=\${$name:-}"
        [ -n "$value" ] && return 0
    done
    return 1
}

command -v packer >/dev/null 2>&1 || fail "packer is not installed (apt-get install packer)"
case $cloud in
    aws)
        any AWS_ACCESS_KEY_ID AWS_PROFILE AWS_WEB_IDENTITY_TOKEN_FILE \
            AWS_CONTAINER_CREDENTIALS_FULL_URI AWS_CONTAINER_CREDENTIALS_RELATIVE_URI ||
            [ -f "$HOME/.aws/credentials" ] || [ -f "$HOME/.aws/config" ] ||
            [ "${AWS_USE_INSTANCE_ROLE:-}" = 1 ] ||
            fail "no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials; AWS_USE_INSTANCE_ROLE=1 on EC2 with a role)"
        ;;
    gcp)
        missing=""
        any GOOGLE_APPLICATION_CREDENTIALS GOOGLE_CREDENTIALS GOOGLE_OAUTH_ACCESS_TOKEN ||
            [ -f "$HOME/.config/gcloud/application_default_credentials.json" ] ||
            [ "${GCE_USE_METADATA_CREDENTIALS:-}" = 1 ] ||
            missing="GOOGLE_APPLICATION_CREDENTIALS (or \`gcloud auth application-default login\`)"
        any CLOUDSDK_CORE_PROJECT GCP_PROJECT ||
            missing="${missing:+$missing and }CLOUDSDK_CORE_PROJECT (the project to build in)"
        [ -z "$missing" ] || fail "no GCP credentials: set $missing"
        ;;
    azure)
        missing=""
        any ARM_SUBSCRIPTION_ID || missing="ARM_SUBSCRIPTION_ID"
        { any ARM_CLIENT_ID && any ARM_CLIENT_SECRET && any ARM_TENANT_ID; } ||
            [ "${AZURE_CLI_AUTH:-}" = 1 ] || [ "${ARM_USE_MSI:-}" = 1 ] ||
            missing="${missing:+$missing and }ARM_CLIENT_ID/ARM_CLIENT_SECRET/ARM_TENANT_ID (or AZURE_CLI_AUTH=1 after \`az login\`)"
        [ -z "$missing" ] || fail "no Azure credentials: set $missing"
        ;;
    *) fail "unknown cloud $cloud (aws, gcp, azure)" ;;
esac
