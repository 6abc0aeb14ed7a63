// Everything the ACI path needs for one client, in one resource group:
// queues, registry, runtime identity, Key Vault, monitoring and budget
// (shared modules under infra/modules, reused by the Container Apps path),
// plus the Logic Apps that turn each queue message into a container group
// (which settles the message itself), drain the webhook outbox with a
// `worker deliver` group, and delete finished groups.
//
// Deploy (see README.md next to this file):
//   az deployment group create -g <rg> -f infra/aci/main.bicep -p @main.parameters.json

@description('Client name: lowercase letters, digits and single hyphens. Queues are <client>-tasks and <client>-tasks-poison.')
@minLength(2)
@maxLength(20)
param client string

param location string = resourceGroup().location

@description('Image tag the Logic App starts (a git sha pushed by CI; latest only for a first test).')
param imageTag string

@description('vCPU cores per task container (decimal string).')
param cpuCores string = '1'

@description('Memory in GB per task container (decimal string).')
param memoryInGb string = '2'

@description('WORKER_TASK_TIMEOUT in seconds: ACI stops containers without a grace period, so this is the only timeout guard.')
@minValue(1)
param taskTimeoutSeconds int = 1800

@description('E-mail addresses for alerts and budget notifications.')
@minLength(1)
param alertEmails array

@description('Optional HTTPS endpoint that also receives alerts. Empty: none.')
param alertWebhookUrl string = ''

@description('Monthly budget for the resource group, in the billing currency.')
param monthlyBudget int = 50

// No default: the Consumption API refuses to change a budget's start date
// ("Start date of budgets cannot be updated"), and a default of this month
// would change it on every redeployment from the second month on. Set it once,
// to the first day of the month of the first deployment, in the parameter file.
@description('First day of the budget period (yyyy-MM-01): the month of the first deployment, then never changed (Azure refuses to move a budget\'s start).')
@minLength(10)
@maxLength(10)
param budgetStartDate string

@allowed([
  'Enabled'
  'Disabled'
])
// Enabled by default: a redeployment is how an image is rolled out, and a
// default of Disabled would switch intake off at every rollout without any
// alert (a disabled workflow fails nothing). The first deployment, before an
// image exists, passes triggerState=Disabled on the command line.
@description('State of the queue trigger and of the outbox drain. Pass Disabled only for the first deployment, until the first image is pushed and the manual test passed.')
param triggerState string = 'Enabled'

@description('Seconds a received message stays hidden from other trigger runs: the worst case of one run plus the start of the group; then the worker in the group holds the lease (WORKER_VISIBILITY_TIMEOUT).')
@minValue(1800)
@maxValue(3600)
param visibilityTimeoutSeconds int = 1800

@description('WORKER_MAX_DEQUEUE_COUNT: container groups (attempts) per message before it goes to <client>-tasks-poison.')
@minValue(1)
@maxValue(100)
param maxDequeueCount int = 5

@description('Seconds between trigger polls; each poll is billed, idle or not.')
@minValue(10)
param triggerIntervalSeconds int = 30

@description('Minutes between two peeks at the webhook outbox <client>-webhooks; each run is billed, idle or not.')
@minValue(1)
@maxValue(15)
param deliverIntervalMinutes int = 5

@description('alert-<client>-worker-backlog fires when a visible task message was inserted more than this many minutes ago (the cleanup looks every cleanupIntervalMinutes): intake is stalled.')
@minValue(15)
param backlogAlertMinutes int = 60

@description('Minutes between two runs of the cleanup workflow, which deletes every container group that has ended (each counts against the ACI group quota until then).')
@minValue(1)
@maxValue(60)
param cleanupIntervalMinutes int = 5

@description('Trigger runs at once, and so task groups created per minute at most (ACI: 300 creates an hour, 100 in 5 minutes, per subscription and region).')
@minValue(1)
@maxValue(5)
param startsPerMinute int = 4

@secure()
@description('SUPABASE_KEY for exec handlers (any non-empty placeholder when unused).')
param supabaseKey string

@secure()
@description('OPENAI_API_KEY for exec handlers (any non-empty placeholder when unused).')
param openaiApiKey string

@secure()
@description('WORKER_WEBHOOK_SECRET: whsec_ + base64 of 24-64 random bytes.')
param webhookSecret string

// List prices for the dashboard's cost estimate only (nothing is billed by
// them): USD, pay-as-you-go, East US, Linux container groups, as quoted in
// README.md next to this file; recorded 2026-12-01 and not re-checked against
// the live price list since. Set your region's and currency's prices here.
@description('Dashboard cost estimate: list price per vCPU-second (decimal string; default USD, East US, Linux container groups, 2026-12-01).')
param pricePerVcpuSecond string = '0.0000113'

@description('Dashboard cost estimate: list price per GB-second of memory (decimal string; default USD, East US, Linux container groups, 2026-12-01).')
param pricePerGbSecond string = '0.0000012'

param tags object = {}

var suffix = uniqueString(resourceGroup().id, client)
var compactClient = replace(client, '-', '')
// Globally unique names keep all 13 characters of the suffix: the client is
// cut instead (2 + 9 + 13 = 24, the storage and vault limit; a registry takes
// 50, room for the whole client). tests/infra.rs checks this for a 20-character
// client.
var storageAccountName = 'st${take(compactClient, 9)}${suffix}'
var registryName = 'cr${compactClient}${suffix}'
var keyVaultName = 'kv${take(compactClient, 9)}${suffix}'
var workspaceName = 'log-${client}-worker'
var allTags = union(tags, {
  workload: 'worker'
  client: client
})

module storage '../modules/storage.bicep' = {
  name: 'storage-${client}'
  params: {
    client: client
    accountName: storageAccountName
    location: location
    tags: allTags
    // Task and deliver containers write and drain the webhook outbox (queues,
    // and blobs for outcomes too large for a queue message).
    dataContributorPrincipalIds: [
      identity.outputs.principalId
    ]
  }
}

module identity '../modules/identity.bicep' = {
  name: 'identity-${client}'
  params: {
    name: 'id-${client}-worker'
    location: location
    tags: allTags
  }
}

module registry '../modules/registry.bicep' = {
  name: 'registry-${client}'
  params: {
    registryName: registryName
    location: location
    tags: allTags
    pullPrincipalIds: [
      identity.outputs.principalId
    ]
  }
}

module monitoring '../modules/monitoring.bicep' = {
  name: 'monitoring-${client}'
  params: {
    client: client
    workspaceName: workspaceName
    location: location
    tags: allTags
    alertEmails: alertEmails
    alertWebhookUrl: alertWebhookUrl
    monthlyBudget: monthlyBudget
    budgetStartDate: budgetStartDate
  }
}

// The task dashboard (an Azure Monitor workbook on the worker's log lines).
module dashboard '../modules/dashboard.bicep' = {
  name: 'dashboard-${client}'
  params: {
    client: client
    location: location
    tags: allTags
    workspaceId: monitoring.outputs.workspaceId
    vcpuCores: cpuCores
    memoryInGb: memoryInGb
    pricePerVcpuSecond: pricePerVcpuSecond
    pricePerGbSecond: pricePerGbSecond
  }
}

// Read back here (not output by the module) so the key only ever travels into
// a secure parameter.
resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

module keyVault '../modules/keyvault.bicep' = {
  name: 'keyvault-${client}'
  dependsOn: [
    storage
  ]
  params: {
    vaultName: keyVaultName
    location: location
    tags: allTags
    storageConnectionString: 'DefaultEndpointsProtocol=https;AccountName=${storageAccountName};AccountKey=${storageAccount.listKeys().keys[0].value};EndpointSuffix=${environment().suffixes.storage}'
    supabaseKey: supabaseKey
    openaiApiKey: openaiApiKey
    webhookSecret: webhookSecret
  }
}

module trigger 'logic-app-trigger.bicep' = {
  name: 'logic-app-${client}'
  params: {
    client: client
    location: location
    tags: allTags
    storageAccountName: storage.outputs.accountName
    keyVaultName: keyVault.outputs.vaultName
    vaultEntryNames: keyVault.outputs.entryNames
    registryLoginServer: registry.outputs.loginServer
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    image: '${registry.outputs.loginServer}/worker:${imageTag}'
    cpuCores: cpuCores
    memoryInGb: memoryInGb
    taskTimeoutSeconds: taskTimeoutSeconds
    workspaceName: monitoring.outputs.workspaceName
    actionGroupId: monitoring.outputs.actionGroupId
    triggerState: triggerState
    triggerIntervalSeconds: triggerIntervalSeconds
    visibilityTimeoutSeconds: visibilityTimeoutSeconds
    maxDequeueCount: maxDequeueCount
    deliverIntervalMinutes: deliverIntervalMinutes
    cleanupIntervalMinutes: cleanupIntervalMinutes
    startsPerMinute: startsPerMinute
    backlogAlertMinutes: backlogAlertMinutes
  }
}

output storageAccountName string = storage.outputs.accountName
output tasksQueueName string = storage.outputs.tasksQueueName
output poisonQueueName string = storage.outputs.poisonQueueName
output webhooksQueueName string = storage.outputs.webhooksQueueName
output registryName string = registry.outputs.registryName
output registryLoginServer string = registry.outputs.loginServer
output identityName string = identity.outputs.name
output identityClientId string = identity.outputs.clientId
output keyVaultName string = keyVault.outputs.vaultName
output workspaceName string = monitoring.outputs.workspaceName
output triggerWorkflowName string = trigger.outputs.triggerWorkflowName
output cleanupWorkflowName string = trigger.outputs.cleanupWorkflowName
output deliverWorkflowName string = trigger.outputs.deliverWorkflowName
