// The Container Apps path: an environment that logs to Log Analytics and an
// event-driven job that runs `worker` in job mode.
//
// The platform only counts messages: KEDA's azure-queue scaler polls two
// queues and starts executions (one replica each). The platform never hands
// a message to a container and never retries one.
//   <client>-tasks     one execution per message (queueLength 1); messages
//                      leased by running executions still count, so each
//                      running execution accounts for its own message.
//   <client>-webhooks  the webhook outbox: one execution per 32 entries that
//                      are due (queueLength 32, queueLengthStrategy
//                      visibleonly: entries wait invisible until their next
//                      attempt and must not start executions before then).
// Each execution's container (WORKER_MODE=job) leases at most one task
// message itself, renews the lease at half-life while the task runs, settles
// it (delete / retry after backoff / poison), then delivers up to 32 due
// outbox entries and exits 0 or 1. So an execution started for the outbox
// does useful work even when <client>-tasks is empty.
// Retries therefore come from the queue's dequeue count, so the platform's
// own retry is off (replicaRetryLimit 0): a replica exiting 1 has already put
// its message back with a delay, or moved it to <client>-tasks-poison.
//
// replicaTimeout is WORKER_TASK_TIMEOUT plus a margin for start-up, webhook
// delivery, settlement and the outbox batch, so the worker's own timeout
// always fires first and reports `task.timed_out`; the platform's kill is
// only a backstop. tests/infra.rs checks that relation by reading this file.
//
// Secrets are Key Vault references resolved by the job's user-assigned
// identity; the queues are reached with the same identity (Entra ID), so the
// container holds no storage key at all.

@minLength(2)
@maxLength(20)
param client string

@description('Container Apps environment name.')
param environmentName string = 'cae-${client}-worker'

@description('Job name: lowercase letters, digits and hyphens.')
param jobName string = 'job-${client}-worker'

param location string = resourceGroup().location
param tags object = {}

@description('Storage account holding <client>-tasks and <client>-webhooks (storage module output accountName).')
param storageAccountName string

@description('Key Vault URI, ending in a slash (keyvault module output vaultUri).')
param vaultUri string

@description('Environment variable name -> Key Vault entry name (keyvault module output entryNames).')
param vaultEntryNames object

param registryLoginServer string

@description('Resource id of the user-assigned identity: AcrPull, Key Vault Secrets User, Storage Queue and Blob Data Contributor.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID for the worker).')
param identityClientId string

@description('Full image reference, e.g. myregistry.azurecr.io/worker:<git sha>.')
param image string

@description('vCPU cores per execution (a decimal string).')
param cpuCores string = '1'

@description('Memory in GiB per execution (a decimal string).')
param memoryInGb string = '2'

@description('WORKER_TASK_TIMEOUT in seconds.')
@minValue(1)
param taskTimeoutSeconds int = 1800

@description('Seconds on top of the task timeout before the platform stops a replica: start-up, webhook delivery with retries, settlement, one batch of up to 32 outbox deliveries.')
@minValue(300)
param settleMarginSeconds int = 360

@description('WORKER_VISIBILITY_TIMEOUT: the lease on the message, renewed at half-life while the task runs; also how long a crashed execution keeps its message hidden.')
@minValue(60)
@maxValue(3600)
param visibilityTimeoutSeconds int = 300

@description('WORKER_MAX_DEQUEUE_COUNT: deliveries before a failing message is poisoned.')
@minValue(1)
param maxDequeueCount int = 5

@description('WORKER_RETRY_DELAY: base seconds before a failed message is visible again (doubles per attempt).')
@minValue(0)
param retryDelaySeconds int = 10

@description('Most executions the platform starts per polling interval.')
@minValue(1)
param maxExecutions int = 10

@description('Seconds between two polls of the queue by the scaler.')
@minValue(10)
param pollingIntervalSeconds int = 30

@allowed([
  'identity'
  'connectionString'
])
@description('How the scaler reads the queue lengths: the job identity (Entra ID), or the connection string from Key Vault.')
param scalerAuth string = 'identity'

param workspaceName string

var tasksQueueName = '${client}-tasks'
var webhooksQueueName = '${client}-webhooks'
var replicaTimeoutSeconds = taskTimeoutSeconds + settleMarginSeconds
var connectionStringSecretName = 'azure-storage-connection-string'
// One execution per task message. The default strategy (all) also counts
// the messages running executions hold leased; KEDA's default job scaling
// subtracts running executions from the count, so a visible-only count would
// start too few.
var tasksRuleMetadata = {
  accountName: storageAccountName
  queueName: tasksQueueName
  queueLength: '1'
}
// One execution per 32 due outbox entries (what one execution delivers).
// visibleonly peeks, so entries still waiting for their next attempt do not
// count; from 32 visible entries on, KEDA falls back to counting every entry.
var outboxRuleMetadata = {
  accountName: storageAccountName
  queueName: webhooksQueueName
  queueLength: '32'
  queueLengthStrategy: 'visibleonly'
}
var connectionStringAuth = [
  {
    secretRef: connectionStringSecretName
    triggerParameter: 'connection'
  }
]
var scaleRulesWithIdentity = [
  {
    name: 'tasks-queue'
    type: 'azure-queue'
    metadata: tasksRuleMetadata
    identity: identityId
  }
  {
    name: 'webhooks-queue'
    type: 'azure-queue'
    metadata: outboxRuleMetadata
    identity: identityId
  }
]
var scaleRulesWithConnectionString = [
  {
    name: 'tasks-queue'
    type: 'azure-queue'
    metadata: tasksRuleMetadata
    auth: connectionStringAuth
  }
  {
    name: 'webhooks-queue'
    type: 'azure-queue'
    metadata: outboxRuleMetadata
    auth: connectionStringAuth
  }
]

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
}

resource environment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: environmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: workspace.properties.customerId
        sharedKey: workspace.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
    zoneRedundant: false
  }
}

resource job 'Microsoft.App/jobs@2025-01-01' = {
  name: jobName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    environmentId: environment.id
    workloadProfileName: 'Consumption'
    configuration: {
      triggerType: 'Event'
      replicaTimeout: replicaTimeoutSeconds
      replicaRetryLimit: 0
      eventTriggerConfig: {
        parallelism: 1
        replicaCompletionCount: 1
        scale: {
          minExecutions: 0
          maxExecutions: maxExecutions
          pollingInterval: pollingIntervalSeconds
          rules: scalerAuth == 'identity' ? scaleRulesWithIdentity : scaleRulesWithConnectionString
        }
      }
      registries: [
        {
          server: registryLoginServer
          identity: identityId
        }
      ]
      // Only the scaler fallback (scalerAuth=connectionString) reads the first
      // entry; the container gets no storage key either way.
      secrets: [
        {
          name: connectionStringSecretName
          keyVaultUrl: '${vaultUri}secrets/${vaultEntryNames.AZURE_STORAGE_CONNECTION_STRING}'
          identity: identityId
        }
        {
          name: 'worker-webhook-secret'
          keyVaultUrl: '${vaultUri}secrets/${vaultEntryNames.WORKER_WEBHOOK_SECRET}'
          identity: identityId
        }
        {
          name: 'supabase-key'
          keyVaultUrl: '${vaultUri}secrets/${vaultEntryNames.SUPABASE_KEY}'
          identity: identityId
        }
        {
          name: 'openai-api-key'
          keyVaultUrl: '${vaultUri}secrets/${vaultEntryNames.OPENAI_API_KEY}'
          identity: identityId
        }
      ]
    }
    template: {
      containers: [
        {
          name: 'worker'
          image: image
          resources: {
            cpu: json(cpuCores)
            memory: '${memoryInGb}Gi'
          }
          env: [
            {
              name: 'WORKER_MODE'
              value: 'job'
            }
            {
              name: 'WORKER_CLIENT'
              value: client
            }
            {
              name: 'AZURE_STORAGE_ACCOUNT'
              value: storageAccountName
            }
            {
              name: 'AZURE_CLIENT_ID'
              value: identityClientId
            }
            {
              name: 'WORKER_TASK_TIMEOUT'
              value: string(taskTimeoutSeconds)
            }
            {
              name: 'WORKER_VISIBILITY_TIMEOUT'
              value: string(visibilityTimeoutSeconds)
            }
            {
              name: 'WORKER_MAX_DEQUEUE_COUNT'
              value: string(maxDequeueCount)
            }
            {
              name: 'WORKER_RETRY_DELAY'
              value: string(retryDelaySeconds)
            }
            {
              name: 'WORKER_LOG_FORMAT'
              value: 'json'
            }
            {
              name: 'WORKER_WEBHOOK_SECRET'
              secretRef: 'worker-webhook-secret'
            }
            {
              name: 'SUPABASE_KEY'
              secretRef: 'supabase-key'
            }
            {
              name: 'OPENAI_API_KEY'
              secretRef: 'openai-api-key'
            }
          ]
        }
      ]
    }
  }
}

output environmentName string = environment.name
output jobName string = job.name
output replicaTimeoutSeconds int = replicaTimeoutSeconds
