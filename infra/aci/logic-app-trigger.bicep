// Starts one Azure Container Instances group per queue message, and leaves the
// message to the worker inside it: the message is deleted (or poisoned) only
// once that worker has settled it, so a container that dies takes no task with
// it (at-least-once, like the polling and Container Apps paths), and every
// ending that owes the backend a webhook is the worker's, which sends it.
//
// Flow of one run (one run per message, `splitOn`; at most startsPerMinute
// runs at once):
//   trigger      "when there are messages in a queue" on <client>-tasks every
//                30 s; the receive hides the message for `visibilityTimeoutSeconds`
//                (30 min by default), after which the worker in the group holds
//                the lease. The trigger's outputs are secure: they hold the
//                message text and the pop receipt.
//   Handle       Message: id, attempt (the queue's dequeue count, as job mode
//                counts it), group name <client>-<message id> (unique: two
//                tasks never share a group) and the last moment a group may be
//                created; no action but the create reads the task text. Look
//                the group up and decide:
//                  absent                        -> create
//                  running or pending            -> wait: leave the message; the
//                                                   receive already hid it again
//                  ended, or never started       -> report it if it ended
//                                                   abnormally, delete it, create
//                The group gets the message's text and coordinates
//                (TASK_DATA, WORKER_MESSAGE_ID, WORKER_POP_RECEIPT,
//                WORKER_DEQUEUE_COUNT) as secure values. Nothing is validated
//                here: an invalid task, or one above WORKER_MAX_DEQUEUE_COUNT,
//                is poisoned by the worker with a task.failed webhook.
//   Settle       started or waiting: nothing (the message is not deleted here);
//                any failure (lookup, secrets, delete, create, or a run that
//                started too late to hand over safely): fail the run
//                (RunsFailed alert) and leave the message, which comes back
//                after the visibility timeout as one more delivery.
//
// The worker in the group first renews the message's visibility with the pop
// receipt it was given (taking the lease over; if that fails, another attempt
// owns the message and it runs nothing), then settles it exactly as job mode
// does. A group that ends without settling (OOM, node loss, pull failure,
// stop) leaves the message to reappear within one lease window, and the next
// run replaces the group.
//
// The task containers also get WORKER_CLIENT, the storage account and the
// client id of their identity, so they can settle the message and write a
// webhook they cannot deliver to the outbox <client>-webhooks. A second
// workflow drains that outbox with a `worker deliver` group (see `deliver`
// below), a third deletes groups as soon as they ended (they count against
// the ACI quota) and reports the ones that ended abnormally.

@minLength(2)
@maxLength(20)
param client string

param location string = resourceGroup().location
param tags object = {}

param storageAccountName string
param keyVaultName string

@description('Environment variable name -> Key Vault entry name (keyvault.bicep output entryNames).')
param vaultEntryNames object

param registryLoginServer string

@description('Resource id of the user-assigned identity of the worker containers: pulls the image and reaches the queues.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID in the containers).')
param identityClientId string

@description('Full image reference, e.g. myregistry.azurecr.io/worker:<git sha>.')
param image string

@description('vCPU cores per task (a decimal string).')
param cpuCores string = '1'

@description('Memory in GB per task (a decimal string).')
param memoryInGb string = '2'

@description('WORKER_TASK_TIMEOUT in seconds: the only timeout guard on this path.')
param taskTimeoutSeconds int = 1800

param workspaceName string
param actionGroupId string

@allowed([
  'Enabled'
  'Disabled'
])
@description('State of the queue trigger and of the outbox drain. Enabled, so that every redeployment (an image rollout) keeps intake on; pass Disabled explicitly for the very first deployment, before an image exists.')
param triggerState string = 'Enabled'

@minValue(10)
param triggerIntervalSeconds int = 30

@description('How long the receive hides a message from other trigger runs: the worst case of one run (every request timing out, every retry used) plus the start of the group, after which the worker holds the lease. tests/infra.rs checks the minimum against that worst case.')
@minValue(1800)
@maxValue(3600)
param visibilityTimeoutSeconds int = 1800

@description('WORKER_MAX_DEQUEUE_COUNT: attempts (container groups) that run the task. The worker poisons a message whose last attempt failed; after a last attempt that ended without settling, one more group poisons it without running it (with task.failed), and if that one dies too the trigger poisons it.')
@minValue(1)
@maxValue(100)
param maxDequeueCount int = 5

@description('Minutes between two peeks at the webhook outbox (each run is billed, idle or not).')
@minValue(1)
@maxValue(15)
param deliverIntervalMinutes int = 5

@description('Minutes between two cleanup runs, which delete every group that has ended (and report the ones that ended abnormally). A finished group counts against the ACI quota until then.')
@minValue(1)
@maxValue(60)
param cleanupIntervalMinutes int = 5

@description('Trigger runs at once; a run that tried a create holds its slot for a minute, so this is also the most groups created per minute (ACI allows 300 creates an hour and 100 in 5 minutes per subscription and region).')
@minValue(1)
@maxValue(5)
param startsPerMinute int = 4

@description('The cleanup reports a backlog (and alert-<client>-worker-backlog fires) when a visible task message was inserted more than this many minutes ago: intake is stalled (trigger disabled or failing).')
@minValue(15)
param backlogAlertMinutes int = 60

@description('Groups still pending or running this long after their creation are stopped by the cleanup workflow, which deletes them on its next run; their message comes back as one more delivery.')
@minValue(2)
param maxGroupAgeHours int = 12

var tasksQueueName = '${client}-tasks'
var poisonQueueName = '${client}-tasks-poison'
var webhooksQueueName = '${client}-webhooks'
var deliverGroupName = '${client}-webhooks-deliver'
// A run creates no group later than this before its message becomes visible
// again: the create itself (two tries of at most 120 s, 5 s apart) plus the
// group's start (pull, up to 300 s) fit in it, so the worker holds the lease
// before any other run can receive the message. tests/infra.rs checks it.
var handOverMarginSeconds = 600
// Key Vault references in the group itself (properties.secretReferences,
// env secureValueReference, resolved with a user-assigned identity) are in
// the REST specification from 2025-09-01 on (Azure/azure-rest-api-specs,
// containerinstance examples/2025-09-01/ContainerGroupsCreateOrUpdate
// SecretReference.json); they would let the workflows pass vault URIs
// instead of reading secrets. Not used yet: no Learn page found documents
// them for ACI, and no azure-mgmt-containerinstance release on PyPI (10.1.0 is the
// newest, 2023-05-01) carries that version, so .ci/api_models.py could not
// check the bodies. infra/aci/README.md, Trade-offs, says what changes then.
var aciApiVersion = '2023-05-01'
var queueApiVersion = '2021-08-06'
// Every Queue service REST call the workflows make with their managed
// identity: the version, and the request time, which Storage requires with
// an Entra ID token too and answers 403 without ("Authorize requests to Azure
// Storage with Microsoft Entra ID" and the Logic Apps managed-identity page:
// x-ms-date in RFC 1123 form).
var queueHeaders = {
  'x-ms-version': queueApiVersion
  'x-ms-date': '@{formatDateTime(utcNow(), \'r\')}'
}
// Storage's XML answers start with a byte-order mark (Azurite#2603 shows the
// same), on which xml() may fail. The peeks are read as text instead
// (string() casts a non-JSON body to text) and counted by their elements:
// sub(length(split(string(body(...)), '<QueueMessage>')), 1).
var queueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var queueDataReaderRoleId = '19e7f393-937e-4f77-808e-94535e297925'
var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
// Managed Identity Operator (built-in role: read and assign user-assigned identities).
var identityOperatorRoleId = 'f1a07417-d97a-45cb-824c-7a7467783830'
// The Key Vault entries the trigger passes to a task group.
var triggerSecretNames = [
  vaultEntryNames.WORKER_WEBHOOK_SECRET
  vaultEntryNames.SUPABASE_KEY
  vaultEntryNames.OPENAI_API_KEY
]
var groupsUrl = '${environment().resourceManager}subscriptions/${subscription().subscriptionId}/resourceGroups/${resourceGroup().name}/providers/Microsoft.ContainerInstance/containerGroups'
var armAuth = {
  type: 'ManagedServiceIdentity'
  audience: environment().resourceManager
}
var storageAuth = {
  type: 'ManagedServiceIdentity'
  audience: 'https://storage.azure.com/'
}
var vaultAuth = {
  type: 'ManagedServiceIdentity'
  audience: 'https://${substring(environment().suffixes.keyvaultDns, 1)}'
}
var queuePath = '/v2/storageAccounts/@{encodeURIComponent(encodeURIComponent(\'${storageAccountName}\'))}/queues'
var queueHost = {
  connection: {
    name: '@parameters(\'$connections\')[\'azurequeues\'][\'connectionId\']'
  }
}
// One retry with a short pause for every request the trigger run makes: each
// request may take up to the 120 s outbound limit of Logic Apps, and the
// whole run must fit in the visibility timeout (tests/infra.rs adds it up).
var shortRetry = {
  type: 'exponential'
  count: 1
  interval: 'PT5S'
  maximumInterval: 'PT5S'
}
// The drain and cleanup workflows' requests: nothing there races a
// visibility timeout, so three retries, 10 s apart and growing. Inside `inputs`, where the
// Workflow Definition Language reads a retry policy ("Retry policies" in
// learn.microsoft.com/azure/logic-apps/logic-apps-exception-handling).
var backgroundRetry = {
  type: 'exponential'
  count: 3
  interval: 'PT10S'
}
var secureInputsAndOutputs = {
  secureData: {
    properties: [
      'inputs'
      'outputs'
    ]
  }
}
// Report_abnormal_end (trigger and cleanup): a group that ended without the
// worker's own report, as tracked properties. With the workflows' diagnostic
// settings they land in AzureDiagnostics as trackedProperties_<name>_s, which
// the abnormalEndsAlert query reads.
var abnormalEndTracked = {
  group: '@{action()[\'inputs\'][\'group\']}'
  messageId: '@{action()[\'inputs\'][\'messageId\']}'
  attempt: '@{action()[\'inputs\'][\'attempt\']}'
  state: '@{action()[\'inputs\'][\'state\']}'
  exitCode: '@{action()[\'inputs\'][\'exitCode\']}'
  detail: '@{action()[\'inputs\'][\'detail\']}'
  verdict: '@{action()[\'inputs\'][\'verdict\']}'
}
var abnormalEndsQuery = '''
AzureDiagnostics
| where ResourceProvider == "MICROSOFT.LOGIC" and Category == "WorkflowRuntime"
| where OperationName has "workflowActionCompleted"
| where resource_actionName_s == "Report_abnormal_end" and status_s == "Succeeded"
| project TimeGenerated, workflow = resource_workflowName_s, run = resource_runId_s,
          group = trackedProperties_group_s,
          message_id = trackedProperties_messageId_s, attempt = trackedProperties_attempt_s,
          state = trackedProperties_state_s, exit_code = trackedProperties_exitCode_s,
          detail = trackedProperties_detail_s, verdict = trackedProperties_verdict_s
'''
var backlogQuery = '''
AzureDiagnostics
| where ResourceProvider == "MICROSOFT.LOGIC" and Category == "WorkflowRuntime"
| where OperationName has "workflowActionCompleted"
| where resource_actionName_s == "Report_backlog" and status_s == "Succeeded"
| project TimeGenerated, workflow = resource_workflowName_s, queue = trackedProperties_queue_s,
          visible = trackedProperties_visible_s, oldest = trackedProperties_oldest_s
'''
var workerTags = {
  'managed-by': 'worker-task'
  'worker-client': client
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource tasksQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  parent: queueService
  name: tasksQueueName
}

// Created by the storage module (and by the worker when missing).
resource outboxQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  parent: queueService
  name: webhooksQueueName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource webhookSecretEntry 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: vaultEntryNames.WORKER_WEBHOOK_SECRET
}

resource triggerSecretEntries 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = [for name in triggerSecretNames: {
  parent: vault
  name: name
}]

// The runtime identity of the groups (identityId is its resource id).
resource workerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  name: last(split(identityId, '/'))
}

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
}

resource queueConnection 'Microsoft.Web/connections@2016-06-01' = {
  name: 'azurequeues-${client}'
  location: location
  tags: tags
  // As in Microsoft's sample for a managed-identity API connection of a
  // Consumption workflow ("Authenticate access with managed identities",
  // Logic Apps): a V1 connection.
  #disable-next-line BCP187
  kind: 'V1'
  properties: {
    displayName: 'Queues of ${storageAccountName} (managed identity)'
    api: {
      id: subscriptionResourceId('Microsoft.Web/locations/managedApis', location, 'azurequeues')
    }
    #disable-next-line BCP089
    parameterValueSet: {
      name: 'managedIdentityAuth'
      values: {}
    }
  }
}

resource trigger 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'la-${client}-worker-trigger'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: triggerState
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {
        '$connections': {
          type: 'Object'
          defaultValue: {}
        }
        logAnalyticsKey: {
          type: 'SecureString'
          defaultValue: ''
        }
      }
      triggers: {
        When_there_are_messages_in_a_queue: {
          type: 'ApiConnection'
          recurrence: {
            frequency: 'Second'
            interval: triggerIntervalSeconds
          }
          splitOn: '@triggerBody()?[\'QueueMessagesList\']?[\'QueueMessage\']'
          inputs: {
            host: queueHost
            method: 'get'
            path: '${queuePath}/@{encodeURIComponent(\'${tasksQueueName}\')}/message_trigger'
            queries: {
              visibilitytimeout: string(visibilityTimeoutSeconds)
            }
          }
          // Each message carries its text and pop receipt (MessageId,
          // PopReceipt, DequeueCount, MessageText): keep them out of the run
          // history. The inputs of actions that read the trigger's outputs
          // are hidden too. At most startsPerMinute runs at once: see Pace.
          runtimeConfiguration: {
            secureData: {
              properties: [
                'inputs'
                'outputs'
              ]
            }
            concurrency: {
              runs: startsPerMinute
            }
          }
        }
      }
      actions: {
        // Transient until an attempt was started or found running; every
        // later step sets what the run ended with.
        Init_outcome: {
          type: 'InitializeVariable'
          runAfter: {}
          inputs: {
            variables: [
              {
                name: 'outcome'
                type: 'string'
                value: 'LookupFailed'
              }
            ]
          }
        }
        Init_start: {
          type: 'InitializeVariable'
          runAfter: {
            Init_outcome: [
              'Succeeded'
            ]
          }
          inputs: {
            variables: [
              {
                name: 'start'
                type: 'boolean'
                value: false
              }
            ]
          }
        }
        Init_secrets_read: {
          type: 'InitializeVariable'
          runAfter: {
            Init_start: [
              'Succeeded'
            ]
          }
          inputs: {
            variables: [
              {
                name: 'secretsRead'
                type: 'boolean'
                value: false
              }
            ]
          }
        }
        Handle: {
          type: 'Scope'
          runAfter: {
            Init_secrets_read: [
              'Succeeded'
            ]
          }
          actions: {
            // Visible, without the task: message id, attempt (dequeue count),
            // group (one per message id: unique, unlike sanitized task ids),
            // createBy (see handOverMarginSeconds). Inputs hidden (they read
            // the trigger); the outputs hold no task data.
            Message: {
              type: 'Compose'
              runAfter: {}
              inputs: {
                id: '@{triggerBody()?[\'MessageId\']}'
                attempt: '@int(coalesce(triggerBody()?[\'DequeueCount\'], \'1\'))'
                group: '@{concat(\'${client}-\', toLower(triggerBody()?[\'MessageId\']))}'
                createBy: '@{addSeconds(trigger()?[\'startTime\'], ${visibilityTimeoutSeconds - handOverMarginSeconds})}'
              }
            }
            Look_up_group: {
              type: 'Http'
              runAfter: {
                Message: [
                  'Succeeded'
                ]
              }
              inputs: {
                method: 'GET'
                uri: '${groupsUrl}/@{outputs(\'Message\')?[\'group\']}?api-version=${aciApiVersion}'
                authentication: armAuth
                retryPolicy: shortRetry
              }
            }
            // Read beside the lookup (they do not depend on it), so the
            // longest path of the run is lookup, delete, create.
            Get_WORKER_WEBHOOK_SECRET: {
              type: 'Http'
              runAfter: {
                Message: [
                  'Succeeded'
                ]
              }
              inputs: {
                method: 'GET'
                uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.WORKER_WEBHOOK_SECRET}?api-version=7.4'
                authentication: vaultAuth
                retryPolicy: shortRetry
              }
              runtimeConfiguration: secureInputsAndOutputs
            }
            Get_SUPABASE_KEY: {
              type: 'Http'
              runAfter: {
                Message: [
                  'Succeeded'
                ]
              }
              inputs: {
                method: 'GET'
                uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.SUPABASE_KEY}?api-version=7.4'
                authentication: vaultAuth
                retryPolicy: shortRetry
              }
              runtimeConfiguration: secureInputsAndOutputs
            }
            Get_OPENAI_API_KEY: {
              type: 'Http'
              runAfter: {
                Message: [
                  'Succeeded'
                ]
              }
              inputs: {
                method: 'GET'
                uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.OPENAI_API_KEY}?api-version=7.4'
                authentication: vaultAuth
                retryPolicy: shortRetry
              }
              runtimeConfiguration: secureInputsAndOutputs
            }
            Mark_secrets_read: {
              type: 'SetVariable'
              runAfter: {
                Get_WORKER_WEBHOOK_SECRET: [
                  'Succeeded'
                ]
                Get_SUPABASE_KEY: [
                  'Succeeded'
                ]
                Get_OPENAI_API_KEY: [
                  'Succeeded'
                ]
              }
              inputs: {
                name: 'secretsRead'
                value: true
              }
            }
            // What the lookup found. 404 is the normal case and marks the
            // lookup Failed; anything but 200 or 404 is transient.
            Previous: {
              type: 'Compose'
              runAfter: {
                Look_up_group: [
                  'Succeeded'
                  'Failed'
                  'TimedOut'
                ]
              }
              inputs: {
                status: '@coalesce(outputs(\'Look_up_group\')?[\'statusCode\'], 0)'
                state: '@{body(\'Look_up_group\')?[\'properties\']?[\'instanceView\']?[\'state\']}'
                provisioningState: '@{body(\'Look_up_group\')?[\'properties\']?[\'provisioningState\']}'
                // -1: no exit code (the container never ran, or is running).
                exitCode: '@coalesce(body(\'Look_up_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'exitCode\'], -1)'
              }
            }
            // Late (past createBy): touch nothing. Running or pending: never
            // touched (duplicates guard). Ended or never started: replaced
            // (this receive made its pop receipt stale). Nothing poisons
            // here: the worker does, with task.failed (see the file's head).
            Decision: {
              type: 'Compose'
              runAfter: {
                Previous: [
                  'Succeeded'
                ]
              }
              inputs: '@if(greaterOrEquals(ticks(utcNow()), ticks(outputs(\'Message\')?[\'createBy\'])), \'Late\', if(equals(outputs(\'Previous\')?[\'status\'], 404), \'create\', if(not(equals(outputs(\'Previous\')?[\'status\'], 200)), \'LookupFailed\', if(or(contains(createArray(\'Succeeded\', \'Failed\', \'Stopped\'), outputs(\'Previous\')?[\'state\']), equals(outputs(\'Previous\')?[\'provisioningState\'], \'Failed\')), \'replace\', \'wait\'))))'
            }
            Route: {
              type: 'Switch'
              runAfter: {
                Decision: [
                  'Succeeded'
                ]
              }
              expression: '@outputs(\'Decision\')'
              cases: {
                Create: {
                  case: 'create'
                  actions: {
                    Mark_start: {
                      type: 'SetVariable'
                      runAfter: {}
                      inputs: {
                        name: 'start'
                        value: true
                      }
                    }
                  }
                }
                Replace: {
                  case: 'replace'
                  actions: {
                    // Exit 0 and 1 are the worker's own report (settled,
                    // retried, poisoned, or the lease was not its own);
                    // anything else (137 = OOM or kill, no exit code = never
                    // started) ended without settling.
                    If_abnormal_end: {
                      type: 'If'
                      runAfter: {}
                      expression: {
                        and: [
                          {
                            not: {
                              contains: [
                                '@createArray(0, 1)'
                                '@outputs(\'Previous\')?[\'exitCode\']'
                              ]
                            }
                          }
                        ]
                      }
                      actions: {
                        Report_abnormal_end: {
                          type: 'Compose'
                          runAfter: {}
                          inputs: {
                            group: '@{body(\'Look_up_group\')?[\'name\']}'
                            messageId: '@{body(\'Look_up_group\')?[\'tags\']?[\'worker-message-id\']}'
                            attempt: '@{body(\'Look_up_group\')?[\'tags\']?[\'worker-attempt\']}'
                            state: '@{body(\'Look_up_group\')?[\'properties\']?[\'instanceView\']?[\'state\']}'
                            exitCode: '@{body(\'Look_up_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'exitCode\']}'
                            detail: '@{body(\'Look_up_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'detailStatus\']}'
                            verdict: 'replaced by the next attempt'
                          }
                          trackedProperties: abnormalEndTracked
                        }
                      }
                      else: {
                        actions: {}
                      }
                    }
                    // Waits for the delete to finish (a 202 is polled), so the
                    // name is free for the create; bounded by limit.timeout.
                    Delete_previous_group: {
                      type: 'Http'
                      runAfter: {}
                      inputs: {
                        method: 'DELETE'
                        uri: '${groupsUrl}/@{outputs(\'Message\')?[\'group\']}?api-version=${aciApiVersion}'
                        authentication: armAuth
                        retryPolicy: shortRetry
                      }
                      limit: {
                        timeout: 'PT2M'
                      }
                    }
                    Mark_restart: {
                      type: 'SetVariable'
                      runAfter: {
                        Delete_previous_group: [
                          'Succeeded'
                        ]
                      }
                      inputs: {
                        name: 'start'
                        value: true
                      }
                    }
                    Mark_delete_failed: {
                      type: 'SetVariable'
                      runAfter: {
                        Delete_previous_group: [
                          'Failed'
                          'TimedOut'
                        ]
                      }
                      inputs: {
                        name: 'outcome'
                        value: 'DeleteFailed'
                      }
                    }
                  }
                }
                Wait: {
                  case: 'wait'
                  actions: {
                    Mark_waiting: {
                      type: 'SetVariable'
                      runAfter: {}
                      inputs: {
                        name: 'outcome'
                        value: 'Waiting'
                      }
                    }
                  }
                }
              }
              default: {
                actions: {
                  Mark_decision: {
                    type: 'SetVariable'
                    runAfter: {}
                    inputs: {
                      name: 'outcome'
                      value: '@{outputs(\'Decision\')}'
                    }
                  }
                }
              }
            }
            Start_attempt: {
              type: 'If'
              runAfter: {
                Route: [
                  'Succeeded'
                  'Failed'
                ]
                Mark_secrets_read: [
                  'Succeeded'
                  'Skipped'
                ]
              }
              expression: {
                and: [
                  {
                    equals: [
                      '@variables(\'start\')'
                      true
                    ]
                  }
                  {
                    equals: [
                      '@variables(\'secretsRead\')'
                      true
                    ]
                  }
                  {
                    less: [
                      '@ticks(utcNow())'
                      '@ticks(outputs(\'Message\')?[\'createBy\'])'
                    ]
                  }
                ]
              }
              actions: {
                // The only action that reads the task text: secure, so the
                // run history never shows it (nor the pop receipt, nor the
                // secrets).
                Create_group: {
                  type: 'Http'
                  runAfter: {}
                  runtimeConfiguration: secureInputsAndOutputs
                  inputs: {
                    method: 'PUT'
                    uri: '${groupsUrl}/@{outputs(\'Message\')?[\'group\']}?api-version=${aciApiVersion}'
                    authentication: armAuth
                    retryPolicy: shortRetry
                    body: {
                      location: location
                      tags: union(workerTags, {
                        'worker-message-id': '@{outputs(\'Message\')?[\'id\']}'
                        'worker-attempt': '@{outputs(\'Message\')?[\'attempt\']}'
                        'worker-created': '@{utcNow()}'
                      })
                      identity: {
                        type: 'UserAssigned'
                        userAssignedIdentities: {
                          '${identityId}': {}
                        }
                      }
                      properties: {
                        osType: 'Linux'
                        sku: 'Standard'
                        restartPolicy: 'Never'
                        imageRegistryCredentials: [
                          {
                            server: registryLoginServer
                            identity: identityId
                          }
                        ]
                        containers: [
                          {
                            name: 'worker'
                            properties: {
                              image: image
                              resources: {
                                requests: {
                                  cpu: json(cpuCores)
                                  memoryInGB: json(memoryInGb)
                                }
                              }
                              environmentVariables: [
                                // Secure like the coordinates: a plain value
                                // is returned by every read of the group, so
                                // Reader on the resource group would read
                                // every task's payload.
                                {
                                  name: 'TASK_DATA'
                                  secureValue: '@{triggerBody()?[\'MessageText\']}'
                                }
                                // The message TASK_DATA came from: the worker
                                // takes its lease over and settles it.
                                {
                                  name: 'WORKER_MESSAGE_ID'
                                  secureValue: '@{triggerBody()?[\'MessageId\']}'
                                }
                                {
                                  name: 'WORKER_POP_RECEIPT'
                                  secureValue: '@{triggerBody()?[\'PopReceipt\']}'
                                }
                                {
                                  name: 'WORKER_DEQUEUE_COUNT'
                                  secureValue: '@{outputs(\'Message\')?[\'attempt\']}'
                                }
                                {
                                  name: 'WORKER_MAX_DEQUEUE_COUNT'
                                  value: string(maxDequeueCount)
                                }
                                {
                                  name: 'WORKER_LOG_FORMAT'
                                  value: 'json'
                                }
                                {
                                  name: 'WORKER_TASK_TIMEOUT'
                                  value: string(taskTimeoutSeconds)
                                }
                                // The tasks queue, its poison queue and the
                                // outbox <client>-webhooks, reached with the
                                // group's identity (no storage key).
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
                                  name: 'WORKER_WEBHOOK_SECRET'
                                  secureValue: '@{body(\'Get_WORKER_WEBHOOK_SECRET\')?[\'value\']}'
                                }
                                {
                                  name: 'SUPABASE_KEY'
                                  secureValue: '@{body(\'Get_SUPABASE_KEY\')?[\'value\']}'
                                }
                                {
                                  name: 'OPENAI_API_KEY'
                                  secureValue: '@{body(\'Get_OPENAI_API_KEY\')?[\'value\']}'
                                }
                              ]
                            }
                          }
                        ]
                        // Which table this fills, and why not diagnostic settings: see
                        // ../modules/container-group.bicep (ContainerInstanceLog_CL).
                        diagnostics: {
                          logAnalytics: {
                            workspaceId: workspace.properties.customerId
                            workspaceKey: '@{parameters(\'logAnalyticsKey\')}'
                            logType: 'ContainerInstanceLogs'
                          }
                        }
                      }
                    }
                  }
                }
                Mark_started: {
                  type: 'SetVariable'
                  runAfter: {
                    Create_group: [
                      'Succeeded'
                    ]
                  }
                  inputs: {
                    name: 'outcome'
                    value: 'Started'
                  }
                }
                Mark_create_failed: {
                  type: 'SetVariable'
                  runAfter: {
                    Create_group: [
                      'Failed'
                      'TimedOut'
                    ]
                  }
                  inputs: {
                    name: 'outcome'
                    value: 'CreateFailed'
                  }
                }
                // The create rate: startsPerMinute runs at once (trigger
                // concurrency), each holding its slot a minute after a
                // create: at most startsPerMinute creates a minute (ACI: 300
                // an hour, 100 in 5 minutes). Other runs wait for a slot.
                Pace: {
                  type: 'Wait'
                  runAfter: {
                    Create_group: [
                      'Succeeded'
                      'Failed'
                      'TimedOut'
                    ]
                  }
                  inputs: {
                    interval: {
                      count: 60
                      unit: 'Second'
                    }
                  }
                }
              }
              else: {
                actions: {
                  If_not_created: {
                    type: 'If'
                    runAfter: {}
                    expression: {
                      and: [
                        {
                          equals: [
                            '@variables(\'start\')'
                            true
                          ]
                        }
                      ]
                    }
                    actions: {
                      Mark_not_created: {
                        type: 'SetVariable'
                        runAfter: {}
                        inputs: {
                          name: 'outcome'
                          value: '@{if(equals(variables(\'secretsRead\'), true), \'Late\', \'SecretsFailed\')}'
                        }
                      }
                    }
                    else: {
                      actions: {}
                    }
                  }
                }
              }
            }
          }
        }
        // Started or waiting: the message is the worker's (or comes back
        // later). Anything else fails the run and leaves the message, which
        // comes back after the visibility timeout. Nothing is deleted or
        // poisoned here: every ending with a webhook is the worker's.
        Settle: {
          type: 'If'
          runAfter: {
            Handle: [
              'Succeeded'
              'Failed'
              'TimedOut'
              'Skipped'
            ]
          }
          expression: {
            and: [
              {
                not: {
                  contains: [
                    '@createArray(\'Started\', \'Waiting\')'
                    '@variables(\'outcome\')'
                  ]
                }
              }
            ]
          }
          actions: {
            Keep_for_later: {
              type: 'Terminate'
              runAfter: {}
              inputs: {
                runStatus: 'Failed'
                runError: {
                  code: '@{variables(\'outcome\')}'
                  message: 'Message @{triggerBody()?[\'MessageId\']} stays in ${tasksQueueName} and is received again after ${visibilityTimeoutSeconds} s (one more delivery): the group lookup (LookupFailed), a Key Vault read (SecretsFailed), deleting the earlier group (DeleteFailed) or the create (CreateFailed: quota, rate, image) failed, or the run started too late to hand the message over safely (Late); see the Handle scope.'
                }
              }
            }
          }
          else: {
            actions: {}
          }
        }
      }
      outputs: {}
    }
    parameters: {
      '$connections': {
        value: {
          azurequeues: {
            id: subscriptionResourceId('Microsoft.Web/locations/managedApis', location, 'azurequeues')
            connectionId: queueConnection.id
            connectionName: queueConnection.name
            connectionProperties: {
              authentication: {
                type: 'ManagedServiceIdentity'
              }
            }
          }
        }
      }
      logAnalyticsKey: {
        value: workspace.listKeys().primarySharedKey
      }
    }
  }
}

// Every cleanupIntervalMinutes: deletes every group that has ended, stops
// groups that overran, and reports every group that ended without the
// worker's own report (run history: Report_abnormal_end; Log Analytics:
// abnormalEndsAlert) before deleting it.
//
// Nothing needs an ended group any more: its output is in Log Analytics
// already, and attempts are the queue's dequeue count, not a tag, so the next
// attempt of its message (if any) starts afresh under the same name. Deleting
// at once keeps finished groups from filling ACI's group quota (100 per
// subscription and region by default): at startsPerMinute creates a minute,
// at most startsPerMinute x (cleanupIntervalMinutes + a run) finished groups
// exist at any moment (tests/infra.rs checks it against the quota). A group
// still pending or running after maxGroupAgeHours is stopped, so it ends like
// a killed container and is deleted by the next run.
resource cleanup 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'la-${client}-worker-cleanup'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: 'Enabled'
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {}
      triggers: {
        Every_few_minutes: {
          type: 'Recurrence'
          recurrence: {
            frequency: 'Minute'
            interval: cleanupIntervalMinutes
          }
          runtimeConfiguration: {
            concurrency: {
              runs: 1
            }
          }
        }
      }
      actions: {
        // Intake stalled: a task message that is visible (nobody holds it)
        // and was inserted more than backlogAlertMinutes ago. The trigger
        // receives a visible message within one polling interval, so this
        // means the trigger is disabled (a redeploy with triggerState
        // Disabled), failing, or cannot keep up. A disabled workflow fails
        // nothing, so no run alert would say so; this run reports it and the
        // backlog alert fires. Peek changes neither visibility nor dequeue
        // count; it returns up to 32 visible messages, oldest first.
        Peek_tasks: {
          type: 'Http'
          runAfter: {}
          inputs: {
            method: 'GET'
            uri: '${storage.properties.primaryEndpoints.queue}${tasksQueueName}/messages?peekonly=true&numofmessages=32'
            headers: queueHeaders
            authentication: storageAuth
            retryPolicy: backgroundRetry
          }
        }
        Backlog: {
          type: 'Compose'
          runAfter: {
            Peek_tasks: [
              'Succeeded'
            ]
          }
          inputs: {
            visible: '@sub(length(split(string(body(\'Peek_tasks\')), \'<QueueMessage>\')), 1)'
            // RFC 1123 (Queue service REST API, Peek Messages); '' when empty.
            oldest: '@{first(split(first(skip(split(concat(string(body(\'Peek_tasks\')), \'<InsertionTime>\'), \'<InsertionTime>\'), 1)), \'</InsertionTime>\'))}'
          }
        }
        If_backlog: {
          type: 'If'
          runAfter: {
            Backlog: [
              'Succeeded'
            ]
          }
          expression: {
            and: [
              {
                greater: [
                  '@outputs(\'Backlog\')?[\'visible\']'
                  0
                ]
              }
              {
                less: [
                  '@ticks(parseDateTime(if(empty(outputs(\'Backlog\')?[\'oldest\']), utcNow(), outputs(\'Backlog\')?[\'oldest\'])))'
                  '@ticks(addMinutes(utcNow(), -${backlogAlertMinutes}))'
                ]
              }
            ]
          }
          actions: {
            Report_backlog: {
              type: 'Compose'
              runAfter: {}
              inputs: {
                queue: tasksQueueName
                visible: '@{outputs(\'Backlog\')?[\'visible\']}'
                oldest: '@{outputs(\'Backlog\')?[\'oldest\']}'
              }
              trackedProperties: {
                queue: '@{action()[\'inputs\'][\'queue\']}'
                visible: '@{action()[\'inputs\'][\'visible\']}'
                oldest: '@{action()[\'inputs\'][\'oldest\']}'
              }
            }
          }
          else: {
            actions: {}
          }
        }
        List_groups: {
          type: 'Http'
          runAfter: {}
          inputs: {
            method: 'GET'
            uri: '${groupsUrl}?api-version=${aciApiVersion}'
            authentication: armAuth
            retryPolicy: backgroundRetry
          }
          runtimeConfiguration: {
            paginationPolicy: {
              minimumItemCount: 1000
            }
          }
        }
        Worker_groups: {
          type: 'Query'
          runAfter: {
            List_groups: [
              'Succeeded'
            ]
          }
          inputs: {
            from: '@body(\'List_groups\')?[\'value\']'
            where: '@and(equals(item()?[\'tags\']?[\'managed-by\'], \'worker-task\'), equals(item()?[\'tags\']?[\'worker-client\'], \'${client}\'))'
          }
        }
        For_each_group: {
          type: 'Foreach'
          foreach: '@body(\'Worker_groups\')'
          runAfter: {
            Worker_groups: [
              'Succeeded'
            ]
          }
          runtimeConfiguration: {
            concurrency: {
              repetitions: 5
            }
          }
          actions: {
            // The list omits the instance view; the state, exit code and
            // finish time need one GET per group.
            Get_group: {
              type: 'Http'
              runAfter: {}
              inputs: {
                method: 'GET'
                uri: '${groupsUrl}/@{items(\'For_each_group\')?[\'name\']}?api-version=${aciApiVersion}'
                authentication: armAuth
                retryPolicy: backgroundRetry
              }
            }
            Facts: {
              type: 'Compose'
              runAfter: {
                Get_group: [
                  'Succeeded'
                ]
              }
              inputs: {
                role: '@{coalesce(body(\'Get_group\')?[\'tags\']?[\'worker-role\'], \'task\')}'
                messageId: '@{body(\'Get_group\')?[\'tags\']?[\'worker-message-id\']}'
                state: '@{body(\'Get_group\')?[\'properties\']?[\'instanceView\']?[\'state\']}'
                provisioningState: '@{body(\'Get_group\')?[\'properties\']?[\'provisioningState\']}'
                // -1: no exit code (the container never ran, or is running).
                exitCode: '@coalesce(body(\'Get_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'exitCode\'], -1)'
                finishTime: '@body(\'Get_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'finishTime\']'
                created: '@body(\'Get_group\')?[\'tags\']?[\'worker-created\']'
              }
            }
            Ended: {
              type: 'Compose'
              runAfter: {
                Facts: [
                  'Succeeded'
                ]
              }
              inputs: '@or(contains(createArray(\'Succeeded\', \'Failed\', \'Stopped\'), outputs(\'Facts\')?[\'state\']), equals(outputs(\'Facts\')?[\'provisioningState\'], \'Failed\'))'
            }
            // delete | stop | keep
            Verdict: {
              type: 'Compose'
              runAfter: {
                Ended: [
                  'Succeeded'
                ]
              }
              inputs: '@if(outputs(\'Ended\'), \'delete\', if(less(ticks(coalesce(outputs(\'Facts\')?[\'created\'], utcNow())), ticks(addHours(utcNow(), -${maxGroupAgeHours}))), \'stop\', \'keep\'))'
            }
            If_abnormal: {
              type: 'If'
              runAfter: {
                Verdict: [
                  'Succeeded'
                ]
              }
              expression: {
                or: [
                  {
                    and: [
                      {
                        equals: [
                          '@outputs(\'Ended\')'
                          true
                        ]
                      }
                      {
                        not: {
                          contains: [
                            '@createArray(0, 1)'
                            '@outputs(\'Facts\')?[\'exitCode\']'
                          ]
                        }
                      }
                    ]
                  }
                  {
                    equals: [
                      '@outputs(\'Verdict\')'
                      'stop'
                    ]
                  }
                ]
              }
              actions: {
                Report_abnormal_end: {
                  type: 'Compose'
                  runAfter: {}
                  inputs: {
                    group: '@{body(\'Get_group\')?[\'name\']}'
                    messageId: '@{body(\'Get_group\')?[\'tags\']?[\'worker-message-id\']}'
                    attempt: '@{body(\'Get_group\')?[\'tags\']?[\'worker-attempt\']}'
                    state: '@{body(\'Get_group\')?[\'properties\']?[\'instanceView\']?[\'state\']}'
                    exitCode: '@{body(\'Get_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'exitCode\']}'
                    detail: '@{body(\'Get_group\')?[\'properties\']?[\'containers\']?[0]?[\'properties\']?[\'instanceView\']?[\'currentState\']?[\'detailStatus\']}'
                    verdict: '@{outputs(\'Verdict\')}'
                  }
                  trackedProperties: abnormalEndTracked
                }
              }
              else: {
                actions: {}
              }
            }
            If_delete: {
              type: 'If'
              runAfter: {
                Verdict: [
                  'Succeeded'
                ]
              }
              expression: {
                and: [
                  {
                    equals: [
                      '@outputs(\'Verdict\')'
                      'delete'
                    ]
                  }
                ]
              }
              actions: {
                // Nothing waits for the name here: a 202 is success, and the
                // action does not poll the operation (DisableAsyncPattern).
                Delete_group: {
                  type: 'Http'
                  runAfter: {}
                  inputs: {
                    method: 'DELETE'
                    uri: '${groupsUrl}/@{items(\'For_each_group\')?[\'name\']}?api-version=${aciApiVersion}'
                    authentication: armAuth
                    retryPolicy: backgroundRetry
                  }
                  operationOptions: 'DisableAsyncPattern'
                }
              }
              else: {
                actions: {}
              }
            }
            // Overran (hung, or stuck pending): stop it, so it ends like a
            // killed container and the trigger counts it as an attempt.
            If_overdue: {
              type: 'If'
              runAfter: {
                Verdict: [
                  'Succeeded'
                ]
              }
              expression: {
                and: [
                  {
                    equals: [
                      '@outputs(\'Verdict\')'
                      'stop'
                    ]
                  }
                ]
              }
              actions: {
                Stop_group: {
                  type: 'Http'
                  runAfter: {}
                  inputs: {
                    method: 'POST'
                    uri: '${groupsUrl}/@{items(\'For_each_group\')?[\'name\']}/stop?api-version=${aciApiVersion}'
                    authentication: armAuth
                    retryPolicy: backgroundRetry
                  }
                }
              }
              else: {
                actions: {}
              }
            }
          }
        }
      }
      outputs: {}
    }
  }
}

// Drains the webhook outbox. A task container that cannot deliver its webhook
// writes the event to <client>-webhooks, invisible until its next attempt is
// due; someone has to run `worker deliver` then. Every `deliverIntervalMinutes`
// this workflow peeks the outbox (peek changes nothing: no dequeue count, no
// visibility) and, when an entry is due and no deliver group is running,
// starts the group <client>-webhooks-deliver running
// `worker deliver --exit-when-empty` (same image and identity as the task
// groups; it exits once nothing is due). A finished deliver group is deleted
// first, so every drain starts with the current image and secret. Runs never
// overlap (trigger concurrency 1).
resource deliver 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'la-${client}-worker-deliver'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: triggerState
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {
        logAnalyticsKey: {
          type: 'SecureString'
          defaultValue: ''
        }
      }
      triggers: {
        Every_few_minutes: {
          type: 'Recurrence'
          recurrence: {
            frequency: 'Minute'
            interval: deliverIntervalMinutes
          }
          runtimeConfiguration: {
            concurrency: {
              runs: 1
            }
          }
        }
      }
      actions: {
        Init_due: {
          type: 'InitializeVariable'
          runAfter: {}
          inputs: {
            variables: [
              {
                name: 'due'
                type: 'boolean'
                value: false
              }
            ]
          }
        }
        Init_start: {
          type: 'InitializeVariable'
          runAfter: {
            Init_due: [
              'Succeeded'
            ]
          }
          inputs: {
            variables: [
              {
                name: 'start'
                type: 'boolean'
                value: false
              }
            ]
          }
        }
        // Visible entries only: one that waits for its next attempt is
        // invisible and does not show up here.
        Peek_outbox: {
          type: 'Http'
          runAfter: {
            Init_start: [
              'Succeeded'
            ]
          }
          inputs: {
            method: 'GET'
            uri: '${storage.properties.primaryEndpoints.queue}${webhooksQueueName}/messages?peekonly=true&numofmessages=1'
            headers: queueHeaders
            authentication: storageAuth
            retryPolicy: backgroundRetry
          }
        }
        // 200 with an empty <QueueMessagesList />: nothing due. 404: the
        // outbox does not exist (yet), so nothing was ever deferred. Anything
        // else (403: the role is missing) fails the run.
        Route_peek: {
          type: 'Switch'
          runAfter: {
            Peek_outbox: [
              'Succeeded'
              'Failed'
            ]
          }
          expression: '@coalesce(outputs(\'Peek_outbox\')?[\'statusCode\'], 0)'
          cases: {
            Peeked: {
              case: 200
              actions: {
                If_entry_due: {
                  type: 'If'
                  runAfter: {}
                  expression: {
                    and: [
                      {
                        greater: [
                          '@sub(length(split(string(body(\'Peek_outbox\')), \'<QueueMessage>\')), 1)'
                          0
                        ]
                      }
                    ]
                  }
                  actions: {
                    Mark_due: {
                      type: 'SetVariable'
                      runAfter: {}
                      inputs: {
                        name: 'due'
                        value: true
                      }
                    }
                  }
                  else: {
                    actions: {}
                  }
                }
              }
            }
            No_outbox: {
              case: 404
              actions: {}
            }
          }
          default: {
            actions: {
              Fail_peek: {
                type: 'Terminate'
                runAfter: {}
                inputs: {
                  runStatus: 'Failed'
                  runError: {
                    code: 'OutboxUnreadable'
                    message: 'Peeking ${webhooksQueueName} failed: check the Storage Queue Data Reader role of this workflow on the queue.'
                  }
                }
              }
            }
          }
        }
        // The variables decide; `Failed` is accepted too because a handled
        // 404 inside a branch may mark the branch Failed (as in the trigger).
        Check_deliver_group: {
          type: 'If'
          runAfter: {
            Route_peek: [
              'Succeeded'
              'Failed'
            ]
          }
          expression: {
            and: [
              {
                equals: [
                  '@variables(\'due\')'
                  true
                ]
              }
            ]
          }
          actions: {
            Look_up_deliver_group: {
              type: 'Http'
              runAfter: {}
              inputs: {
                method: 'GET'
                uri: '${groupsUrl}/${deliverGroupName}?api-version=${aciApiVersion}'
                authentication: armAuth
                retryPolicy: backgroundRetry
              }
            }
            Route_group: {
              type: 'Switch'
              runAfter: {
                Look_up_deliver_group: [
                  'Succeeded'
                  'Failed'
                ]
              }
              expression: '@coalesce(outputs(\'Look_up_deliver_group\')?[\'statusCode\'], 0)'
              cases: {
                Exists: {
                  case: 200
                  actions: {
                    Is_deliver_group: {
                      type: 'If'
                      runAfter: {}
                      expression: {
                        and: [
                          {
                            equals: [
                              '@body(\'Look_up_deliver_group\')?[\'tags\']?[\'worker-role\']'
                              'deliver'
                            ]
                          }
                        ]
                      }
                      actions: {
                        // Running or pending: it drains what is due; come back
                        // next time. Finished: delete it and start afresh (a
                        // PUT on the existing group would not run it again).
                        If_finished: {
                          type: 'If'
                          runAfter: {}
                          expression: {
                            and: [
                              {
                                contains: [
                                  '@createArray(\'Succeeded\', \'Failed\', \'Stopped\')'
                                  '@body(\'Look_up_deliver_group\')?[\'properties\']?[\'instanceView\']?[\'state\']'
                                ]
                              }
                            ]
                          }
                          actions: {
                            Delete_finished_deliver_group: {
                              type: 'Http'
                              runAfter: {}
                              inputs: {
                                method: 'DELETE'
                                uri: '${groupsUrl}/${deliverGroupName}?api-version=${aciApiVersion}'
                                authentication: armAuth
                                retryPolicy: backgroundRetry
                              }
                            }
                            Mark_restart: {
                              type: 'SetVariable'
                              runAfter: {
                                Delete_finished_deliver_group: [
                                  'Succeeded'
                                ]
                              }
                              inputs: {
                                name: 'start'
                                value: true
                              }
                            }
                            Fail_delete: {
                              type: 'Terminate'
                              runAfter: {
                                Delete_finished_deliver_group: [
                                  'Failed'
                                  'TimedOut'
                                ]
                              }
                              inputs: {
                                runStatus: 'Failed'
                                runError: {
                                  code: 'DeleteFailed'
                                  message: 'Deleting the finished container group ${deliverGroupName} failed; the next run tries again.'
                                }
                              }
                            }
                          }
                          else: {
                            actions: {}
                          }
                        }
                      }
                      else: {
                        actions: {
                          // A task group took the name (task id
                          // "webhooks-deliver"): never touch it.
                          Fail_name_taken: {
                            type: 'Terminate'
                            runAfter: {}
                            inputs: {
                              runStatus: 'Failed'
                              runError: {
                                code: 'NameCollision'
                                message: 'Container group ${deliverGroupName} exists but is no deliver group; the outbox waits until it is gone.'
                              }
                            }
                          }
                        }
                      }
                    }
                  }
                }
                Absent: {
                  case: 404
                  actions: {
                    Mark_start: {
                      type: 'SetVariable'
                      runAfter: {}
                      inputs: {
                        name: 'start'
                        value: true
                      }
                    }
                  }
                }
              }
              default: {
                actions: {
                  Fail_lookup: {
                    type: 'Terminate'
                    runAfter: {}
                    inputs: {
                      runStatus: 'Failed'
                      runError: {
                        code: 'LookupFailed'
                        message: 'Looking up container group ${deliverGroupName} failed.'
                      }
                    }
                  }
                }
              }
            }
          }
          else: {
            actions: {}
          }
        }
        Start_deliver_group: {
          type: 'If'
          runAfter: {
            Check_deliver_group: [
              'Succeeded'
              'Failed'
            ]
          }
          expression: {
            and: [
              {
                equals: [
                  '@variables(\'start\')'
                  true
                ]
              }
            ]
          }
          actions: {
            // `worker deliver` runs no handler: the webhook secret is the
            // only secret it needs.
            Get_WORKER_WEBHOOK_SECRET: {
              type: 'Http'
              runAfter: {}
              inputs: {
                method: 'GET'
                uri: '${vault.properties.vaultUri}secrets/${vaultEntryNames.WORKER_WEBHOOK_SECRET}?api-version=7.4'
                authentication: vaultAuth
                retryPolicy: backgroundRetry
              }
              runtimeConfiguration: secureInputsAndOutputs
            }
            Create_deliver_group: {
              type: 'Http'
              runAfter: {
                Get_WORKER_WEBHOOK_SECRET: [
                  'Succeeded'
                ]
              }
              runtimeConfiguration: secureInputsAndOutputs
              inputs: {
                method: 'PUT'
                uri: '${groupsUrl}/${deliverGroupName}?api-version=${aciApiVersion}'
                authentication: armAuth
                // A create refused for quota or capacity (429, 5xx) is worth
                // a few patient retries: the drain has no visibility timeout.
                retryPolicy: {
                  type: 'exponential'
                  count: 4
                  interval: 'PT15S'
                  minimumInterval: 'PT10S'
                  maximumInterval: 'PT2M'
                }
                body: {
                  location: location
                  tags: union(workerTags, {
                    'worker-role': 'deliver'
                    'worker-created': '@{utcNow()}'
                  })
                  identity: {
                    type: 'UserAssigned'
                    userAssignedIdentities: {
                      '${identityId}': {}
                    }
                  }
                  properties: {
                    osType: 'Linux'
                    sku: 'Standard'
                    restartPolicy: 'Never'
                    imageRegistryCredentials: [
                      {
                        server: registryLoginServer
                        identity: identityId
                      }
                    ]
                    containers: [
                      {
                        name: 'worker'
                        properties: {
                          image: image
                          // ACI's command replaces the image's entrypoint.
                          command: [
                            '/usr/local/bin/worker'
                            'deliver'
                            '--exit-when-empty'
                          ]
                          resources: {
                            requests: {
                              cpu: json(cpuCores)
                              memoryInGB: json(memoryInGb)
                            }
                          }
                          environmentVariables: [
                            {
                              name: 'WORKER_LOG_FORMAT'
                              value: 'json'
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
                              name: 'WORKER_WEBHOOK_SECRET'
                              secureValue: '@{body(\'Get_WORKER_WEBHOOK_SECRET\')?[\'value\']}'
                            }
                          ]
                        }
                      }
                    ]
                    // Which table this fills, and why not diagnostic settings: see
                    // ../modules/container-group.bicep (ContainerInstanceLog_CL).
                    diagnostics: {
                      logAnalytics: {
                        workspaceId: workspace.properties.customerId
                        workspaceKey: '@{parameters(\'logAnalyticsKey\')}'
                        logType: 'ContainerInstanceLogs'
                      }
                    }
                  }
                }
              }
            }
          }
          else: {
            actions: {}
          }
        }
      }
      outputs: {}
    }
    parameters: {
      logAnalyticsKey: {
        value: workspace.listKeys().primarySharedKey
      }
    }
  }
}

// The three workflows manage container groups in this resource group and
// nothing else: read/write/delete/stop groups, and follow ACI's asynchronous
// operations: a DELETE may answer 202 (ContainerGroups_Delete is a
// long-running operation in the ACI REST specification), and an HTTP action
// then polls the operation URL it is given (the asynchronous pattern,
// "Run actions in a synchronous operation pattern" in the Logic Apps schema
// reference). The trigger must wait for it before it creates the next attempt
// under the same name, so the role may read ACI's operations and operation
// results; the cleanup does not wait (DisableAsyncPattern). Attaching the
// runtime identity to a group (userAssignedIdentities/assign/action) is not
// here: it is granted on that one identity below, so no other identity in the
// resource group can be attached.
resource launcherRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'worker-task-launcher')
  properties: {
    // Role names are unique in the whole Entra tenant, at most 128 characters
    // (learn.microsoft.com/azure/role-based-access-control/custom-roles,
    // "Custom role properties"): the resource group name alone repeats across
    // subscriptions (RoleDefinitionWithSameNameExists), its id's hash does not.
    roleName: 'Worker task launcher (${take(resourceGroup().name, 60)}, ${uniqueString(resourceGroup().id)})'
    description: 'Create, read, stop and delete container groups and follow their asynchronous operations.'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.ContainerInstance/containerGroups/read'
          'Microsoft.ContainerInstance/containerGroups/write'
          'Microsoft.ContainerInstance/containerGroups/delete'
          'Microsoft.ContainerInstance/containerGroups/stop/action'
          'Microsoft.ContainerInstance/locations/operations/read'
          'Microsoft.ContainerInstance/locations/operationResults/read'
        ]
        notActions: []
      }
    ]
  }
}

resource triggerLauncher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, trigger.id, 'worker-task-launcher')
  properties: {
    roleDefinitionId: launcherRole.id
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource cleanupLauncher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, cleanup.id, 'worker-task-launcher')
  properties: {
    roleDefinitionId: launcherRole.id
    principalId: cleanup.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource deliverLauncher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, deliver.id, 'worker-task-launcher')
  properties: {
    roleDefinitionId: launcherRole.id
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The cleanup peeks at the tasks queue for the backlog report: read-only, on
// that one queue.
resource cleanupTasksReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(tasksQueue.id, cleanup.id, queueDataReaderRoleId)
  scope: tasksQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueDataReaderRoleId)
    principalId: cleanup.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Peek at the outbox and nothing else: read-only, on that one queue.
resource deliverOutboxReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(outboxQueue.id, deliver.id, queueDataReaderRoleId)
  scope: outboxQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueDataReaderRoleId)
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The deliver group needs the webhook secret only.
resource deliverSecret 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(webhookSecretEntry.id, deliver.id, secretsUserRoleId)
  scope: webhookSecretEntry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource triggerQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, trigger.id, queueDataContributorRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueDataContributorRoleId)
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The trigger reads the three secrets it hands to a task group, and nothing
// else in the vault (not the storage connection string): Key Vault RBAC
// roles can be assigned on a single secret.
resource triggerSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in triggerSecretNames: {
  name: guid(triggerSecretEntries[i].id, trigger.id, secretsUserRoleId)
  scope: triggerSecretEntries[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}]

// Attaching the worker identity to the groups they create: Managed Identity
// Operator (built in: read and assign user-assigned identities), on that one
// identity only. The cleanup creates nothing and gets none.
resource triggerIdentityOperator 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workerIdentity.id, trigger.id, identityOperatorRoleId)
  scope: workerIdentity
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', identityOperatorRoleId)
    principalId: trigger.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource deliverIdentityOperator 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workerIdentity.id, deliver.id, identityOperatorRoleId)
  scope: workerIdentity
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', identityOperatorRoleId)
    principalId: deliver.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource triggerDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: trigger
  properties: {
    workspaceId: workspace.id
    logs: [
      {
        category: 'WorkflowRuntime'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

resource cleanupDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: cleanup
  properties: {
    workspaceId: workspace.id
    logs: [
      {
        category: 'WorkflowRuntime'
        enabled: true
      }
    ]
  }
}

resource deliverDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: deliver
  properties: {
    workspaceId: workspace.id
    logs: [
      {
        category: 'WorkflowRuntime'
        enabled: true
      }
    ]
  }
}

// Every run that poisons a message, and every run that could not start an
// attempt, ends Failed: this one alert covers invalid tasks, name collisions,
// exhausted attempts, and lookups, deletes or creates that keep failing.
resource failedRunsAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-trigger-failed-runs'
  location: 'global'
  tags: tags
  properties: {
    description: 'A trigger run failed: its message stays in ${tasksQueueName} for a later run (error code LookupFailed, SecretsFailed, DeleteFailed, CreateFailed, Late); each such receive counts as a delivery.'
    severity: 2
    enabled: true
    scopes: [
      trigger.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'RunsFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'RunsFailed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// A failing trigger (connection or role broken) starts no run at all, so the
// run alert above would stay silent.
resource failedTriggersAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-trigger-failed-polls'
  location: 'global'
  tags: tags
  properties: {
    description: 'The queue trigger cannot read ${tasksQueueName}: check the azurequeues connection and the Logic App role on the storage account.'
    severity: 2
    enabled: true
    scopes: [
      trigger.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'TriggersFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'TriggersFailed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

resource failedCleanupAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-cleanup-failed-runs'
  location: 'global'
  tags: tags
  properties: {
    description: 'Finished container groups are not being deleted; they count against the ACI quota.'
    severity: 3
    enabled: true
    scopes: [
      cleanup.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT6H'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'RunsFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'RunsFailed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// A drain that fails again and again (role missing, image gone, quota) leaves
// webhooks in the outbox until their schedule runs out and they are poisoned.
resource failedDeliverAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${client}-worker-deliver-failed-runs'
  location: 'global'
  tags: tags
  properties: {
    description: 'The outbox drain keeps failing: webhooks wait in ${webhooksQueueName} and end in ${webhooksQueueName}-poison when their schedule runs out.'
    severity: 3
    enabled: true
    scopes: [
      deliver.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'RunsFailed'
          metricNamespace: 'Microsoft.Logic/workflows'
          metricName: 'RunsFailed'
          operator: 'GreaterThan'
          threshold: 2
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// Groups that ended without the worker's own report: the trigger reports the
// earlier attempt it replaces, the cleanup every such group it still finds
// (and the groups it stops). Both write Report_abnormal_end with tracked
// properties; the workflows' diagnostic settings send them to the workspace.
resource abnormalEndsAlert 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${client}-worker-abnormal-ends'
  location: location
  tags: tags
  properties: {
    displayName: 'alert-${client}-worker-abnormal-ends'
    description: 'A task container ended without settling its message (OOM or kill: exit 137; image pull or start failure: no exit code; stopped after ${maxGroupAgeHours} h). Its message comes back and runs again; above ${maxDequeueCount} deliveries the worker moves it to ${poisonQueueName} with a task.failed webhook.'
    severity: 2
    enabled: true
    scopes: [
      workspace.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: abnormalEndsQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

// Intake stalled: the cleanup found a task message waiting, visible,
// for longer than backlogAlertMinutes. The usual cause is a redeployment that
// disabled the trigger (triggerState) or a trigger that cannot read the queue.
resource backlogAlert 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${client}-worker-backlog'
  location: location
  tags: tags
  properties: {
    displayName: 'alert-${client}-worker-backlog'
    description: 'A task message in ${tasksQueueName} has waited, visible, for more than ${backlogAlertMinutes} minutes: intake is stalled. Check that la-${client}-worker-trigger is Enabled (a redeployment with triggerState=Disabled switches it off) and its failed-polls alert.'
    severity: 2
    enabled: true
    scopes: [
      workspace.id
    ]
    evaluationFrequency: 'PT30M'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: backlogQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

output triggerWorkflowName string = trigger.name
output cleanupWorkflowName string = cleanup.name
output deliverWorkflowName string = deliver.name
output triggerPrincipalId string = trigger.identity.principalId
output tasksQueueName string = tasksQueueName
output poisonQueueName string = poisonQueueName
output webhooksQueueName string = webhooksQueueName
